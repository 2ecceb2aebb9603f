"""The admin server and metrics: exposition, the cheap counter methods, health, readiness and the probe.

HTTP goes through aiohttp's test server on loopback; the upstream probe talks to tiny asyncio servers on
loopback that play a postmaster (or fail to).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keymgmt import native
from keymgmt.keystore import ProviderCalls
from proxy.admin.app import (
    API_PREFIX,
    SSL_REQUEST,
    CachedReadiness,
    ReadinessCheck,
    build_admin_app,
    start_admin_server,
    upstream_reachable,
)
from proxy.admin.metrics import Metrics, sqlstate_class
from proxy.errors import RefusalReason

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return float(v)


def fixed(ready: bool, reason: str) -> ReadinessCheck:
    async def check() -> tuple[bool, str]:
        return ready, reason

    return check


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("9.9.9-test")


async def client_for(app: web.Application) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def ready_client(metrics: Metrics) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await client_for(build_admin_app(metrics, fixed(True, "upstream answered"), version="9.9.9-test"))
    yield client
    await client.close()


# -- metrics -------------------------------------------------------------------------------------------
EXPECTED_FAMILIES = [
    "pgveil_build_info",
    "pgveil_sessions_active",
    "pgveil_sessions_total",
    "pgveil_session_duration_seconds",
    "pgveil_relayed_bytes_total",
    "pgveil_relayed_messages_total",
    "pgveil_upstream_connect_seconds",
    "pgveil_upstream_connect_failures_total",
    "pgveil_errors_total",
    "pgveil_protocol_violations_total",
    "pgveil_cancel_requests_total",
    "pgveil_tls_sessions_total",
    "pgveil_backpressure_pauses_total",
    "pgveil_config_reloads_total",
    "pgveil_statements_refused_total",
    "pgveil_values_encrypted_total",
    "pgveil_values_decrypted_total",
    "pgveil_decrypt_failures_total",
    "pgveil_key_cache_hits_total",
    "pgveil_key_cache_misses_total",
    "pgveil_sql_analysis_cache_hits_total",
    "pgveil_sql_analysis_cache_misses_total",
    "pgveil_key_cache_evictions_total",
    "pgveil_key_cache_invalidations_total",
    "pgveil_key_cache_flushes_total",
    "pgveil_key_notifications_total",
    "pgveil_key_refreshes_total",
    "pgveil_key_provider_errors_total",
    "pgveil_key_unwrap_seconds",
]


def test_render_has_every_family_with_help_and_type(metrics: Metrics) -> None:
    payload, content_type = metrics.render()
    text = payload.decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    for name in EXPECTED_FAMILIES:
        assert f"# HELP {name} " in text, name
        assert f"# TYPE {name} " in text, name
    assert f'pgveil_build_info{{implementation="{native.IMPLEMENTATION}",version="9.9.9-test"}} 1.0' in text
    assert "process_resident_memory_bytes" in text


def test_render_speaks_openmetrics_when_asked(metrics: Metrics) -> None:
    payload, content_type = metrics.render("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    assert payload.endswith(b"# EOF\n")


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.cancel_request()
    assert value(a, "pgveil_cancel_requests_total") == 1
    assert value(b, "pgveil_cancel_requests_total") == 0
    assert prometheus_client.REGISTRY.get_sample_value("pgveil_cancel_requests_total") is None


def test_add_relayed_moves_only_its_direction(metrics: Metrics) -> None:
    metrics.add_relayed("client_to_server", 1000, 3)
    metrics.add_relayed("client_to_server", 24, 0)
    metrics.add_relayed("server_to_client", 0, 0)
    assert value(metrics, "pgveil_relayed_bytes_total", direction="client_to_server") == 1024
    assert value(metrics, "pgveil_relayed_messages_total", direction="client_to_server") == 3
    assert value(metrics, "pgveil_relayed_bytes_total", direction="server_to_client") == 0
    assert value(metrics, "pgveil_relayed_messages_total", direction="server_to_client") == 0


def test_sessions_gauge_counter_and_duration(metrics: Metrics) -> None:
    metrics.session_started()
    metrics.session_started()
    assert value(metrics, "pgveil_sessions_active") == 2
    metrics.session_ended(0.5)
    assert value(metrics, "pgveil_sessions_active") == 1
    assert value(metrics, "pgveil_sessions_total") == 2
    assert value(metrics, "pgveil_session_duration_seconds_count") == 1
    assert value(metrics, "pgveil_session_duration_seconds_bucket", le="1.0") == 1
    assert value(metrics, "pgveil_session_duration_seconds_bucket", le="0.1") == 0


def test_upstream_connect_histogram_resolves_sub_millisecond(metrics: Metrics) -> None:
    metrics.upstream_connected(0.0003)
    metrics.upstream_connected(7.0)
    metrics.upstream_connect_failed(10.5)
    metrics.upstream_connect_failed()
    assert value(metrics, "pgveil_upstream_connect_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "pgveil_upstream_connect_seconds_bucket", le="10.0") == 2
    assert value(metrics, "pgveil_upstream_connect_seconds_count") == 3
    assert value(metrics, "pgveil_upstream_connect_failures_total") == 2


def test_errors_are_labelled_by_class_only(metrics: Metrics) -> None:
    metrics.error_sent("08006", "proxy")
    metrics.error_sent("08P01", "proxy")
    metrics.error_sent("42P01", "server")
    metrics.error_sent("ZZ999", "server")  # not a PostgreSQL class: must not become a label value
    metrics.error_sent("4", "server")
    assert value(metrics, "pgveil_errors_total", sqlstate_class="08", source="proxy") == 2
    assert value(metrics, "pgveil_errors_total", sqlstate_class="42", source="server") == 1
    assert value(metrics, "pgveil_errors_total", sqlstate_class="other", source="server") == 2
    assert b"ZZ" not in metrics.render()[0]


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [("0A000", "0A"), ("57P01", "57"), ("XX000", "XX"), ("HV00R", "HV"), ("08", "other"), ("0a000", "other")],
)
def test_sqlstate_class(sqlstate: str, expected: str) -> None:
    assert sqlstate_class(sqlstate) == expected


def test_small_enum_counters(metrics: Metrics) -> None:
    metrics.protocol_violation("client")
    metrics.tls_session("server")
    metrics.tls_session("server")
    metrics.backpressure_paused("server_to_client")
    metrics.config_reloaded(True)
    metrics.config_reloaded(False)
    metrics.config_reloaded(False)
    metrics.statement_refused(RefusalReason.CONSTRUCT, "0A000")
    metrics.add_refusals({(RefusalReason.NOT_READY, "55000"): 2, (RefusalReason.CONSTRUCT, "0A000"): 1})
    metrics.statement_refused(RefusalReason.LEXING, "bogus")  # a malformed SQLSTATE cannot mint a label value
    assert value(metrics, "pgveil_protocol_violations_total", peer="client") == 1
    assert value(metrics, "pgveil_protocol_violations_total", peer="server") == 0
    assert value(metrics, "pgveil_tls_sessions_total", leg="server") == 2
    assert value(metrics, "pgveil_tls_sessions_total", leg="client") == 0
    assert value(metrics, "pgveil_backpressure_pauses_total", direction="server_to_client") == 1
    assert value(metrics, "pgveil_config_reloads_total", result="success") == 1
    assert value(metrics, "pgveil_config_reloads_total", result="failure") == 2
    refused = "pgveil_statements_refused_total"
    assert value(metrics, refused, reason="construct", sqlstate_class="0A") == 2
    assert value(metrics, refused, reason="not_ready", sqlstate_class="55") == 2
    assert value(metrics, refused, reason="lexing", sqlstate_class="other") == 1


def test_batched_value_counters(metrics: Metrics) -> None:
    metrics.add_values(encrypted=5, decrypted=7, decrypt_failures=1, shredded=2)
    metrics.add_values(decrypted=3)
    assert value(metrics, "pgveil_values_encrypted_total") == 5
    assert value(metrics, "pgveil_values_decrypted_total") == 10
    assert value(metrics, "pgveil_decrypt_failures_total") == 1
    assert value(metrics, "pgveil_shredded_reads_total") == 2


@dataclass
class _FakeCache:
    evictions: int = 0
    expirations: int = 0
    invalidations: int = 0
    flushes: int = 0


@dataclass
class _FakeKeystore:
    cache: _FakeCache
    notifications: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    provider_calls: ProviderCalls = field(default_factory=ProviderCalls)


@dataclass
class _FakeKeyRing:
    hits: int = 0
    misses: int = 0


@dataclass
class _FakeContext:
    cache_hits: int = 0
    cache_misses: int = 0


@dataclass
class _FakeRuntime:
    keyring: _FakeKeyRing
    context: _FakeContext
    keystore: _FakeKeystore | None = None


def test_encryption_counters_are_read_when_scraped(metrics: Metrics) -> None:
    # zeros before any runtime is watched: every family exists from the start
    assert value(metrics, "pgveil_key_cache_hits_total") == 0
    assert value(metrics, "pgveil_key_refreshes_total", result="success") == 0
    runtime = _FakeRuntime(_FakeKeyRing(), _FakeContext())
    metrics.watch_encryption(runtime)
    runtime.keyring.hits, runtime.keyring.misses = 10, 1
    runtime.context.cache_hits, runtime.context.cache_misses = 3, 4
    assert value(metrics, "pgveil_key_cache_hits_total") == 10
    assert value(metrics, "pgveil_key_cache_misses_total") == 1
    assert value(metrics, "pgveil_sql_analysis_cache_hits_total") == 3
    assert value(metrics, "pgveil_sql_analysis_cache_misses_total") == 4
    assert value(metrics, "pgveil_key_notifications_total") == 0  # no keystore yet
    runtime.keystore = _FakeKeystore(_FakeCache(5, 6, 7, 8), notifications=9, refreshes=2, refresh_failures=1)
    assert value(metrics, "pgveil_key_cache_evictions_total", cause="capacity") == 5
    assert value(metrics, "pgveil_key_cache_evictions_total", cause="ttl") == 6
    assert value(metrics, "pgveil_key_cache_invalidations_total") == 7
    assert value(metrics, "pgveil_key_cache_flushes_total") == 8
    assert value(metrics, "pgveil_key_notifications_total") == 9
    assert value(metrics, "pgveil_key_refreshes_total", result="success") == 2
    assert value(metrics, "pgveil_key_refreshes_total", result="failure") == 1
    runtime.keyring.hits += 5
    assert value(metrics, "pgveil_key_cache_hits_total") == 15


def test_provider_calls_are_counted_and_unwraps_timed(metrics: Metrics) -> None:
    runtime = _FakeRuntime(_FakeKeyRing(), _FakeContext(), _FakeKeystore(_FakeCache(0, 0, 0, 0)))
    metrics.watch_encryption(runtime)
    assert runtime.keystore is not None
    calls = runtime.keystore.provider_calls
    for _ in range(3):
        with calls.timed("unwrap"):
            pass
    with contextlib.suppress(RuntimeError), calls.timed("unwrap"):
        raise RuntimeError("the token is gone")
    with contextlib.suppress(RuntimeError), calls.timed("wrap"):
        raise RuntimeError("the token is gone")
    assert value(metrics, "pgveil_key_unwrap_seconds_count") == 4
    assert value(metrics, "pgveil_key_unwrap_seconds_bucket", le="+Inf") == 4
    counts = [value(metrics, "pgveil_key_unwrap_seconds_bucket", le=le) for le in ("0.0001", "0.001", "5.0", "+Inf")]
    assert counts == sorted(counts), "cumulative buckets"
    assert value(metrics, "pgveil_key_provider_errors_total", operation="unwrap") == 1
    assert value(metrics, "pgveil_key_provider_errors_total", operation="wrap") == 1


# -- HTTP ----------------------------------------------------------------------------------------------
async def test_metrics_endpoint(ready_client: TestClient[web.Request, web.Application], metrics: Metrics) -> None:
    metrics.add_relayed("server_to_client", 4096, 12)
    resp = await ready_client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'pgveil_relayed_bytes_total{direction="server_to_client"} 4096.0' in await resp.text()


async def test_healthz(ready_client: TestClient[web.Request, web.Application]) -> None:
    resp = await ready_client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "version": "9.9.9-test"}


async def test_readyz_ready(ready_client: TestClient[web.Request, web.Application]) -> None:
    resp = await ready_client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "reason": "upstream answered"}


async def test_readyz_not_ready(metrics: Metrics) -> None:
    client = await client_for(build_admin_app(metrics, fixed(False, "upstream did not answer"), version="v"))
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        assert await resp.json() == {"status": "not ready", "reason": "upstream did not answer"}
    finally:
        await client.close()


async def test_readyz_hides_the_text_of_a_failing_check(metrics: Metrics) -> None:
    async def check() -> tuple[bool, str]:
        raise RuntimeError("could not connect to postgresql://app:hunter2@db/app")

    client = await client_for(build_admin_app(metrics, check, version="v"))
    try:
        resp = await client.get("/readyz")
        assert resp.status == 503
        body = await resp.text()
        assert json.loads(body) == {"status": "not ready", "reason": "readiness check failed"}
        assert "hunter2" not in body
    finally:
        await client.close()


async def test_unknown_path_and_wrong_method_are_json(
    ready_client: TestClient[web.Request, web.Application],
) -> None:
    resp = await ready_client.get("/nope?token=abc")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    body = await resp.text()
    assert json.loads(body) == {"error": "not found"}
    assert "abc" not in body
    resp = await ready_client.post("/healthz")
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert "GET" in resp.headers["Allow"]


async def test_api_subapp_is_mounted_under_v1(metrics: Metrics) -> None:
    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    api = web.Application()
    api.add_routes([web.get("/keys", keys)])
    client = await client_for(build_admin_app(metrics, fixed(True, "ok"), version="v", api=api))
    try:
        resp = await client.get(f"{API_PREFIX}/keys")
        assert resp.status == 200
        assert await resp.json() == {"keys": []}
        resp = await client.get(f"{API_PREFIX}/nope")
        assert resp.status == 404
        assert await resp.json() == {"error": "not found"}
    finally:
        await client.close()


# -- readiness cache -----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingCheck:
    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> tuple[bool, str]:
        self.calls += 1
        await self.release.wait()
        return self.calls % 2 == 1, f"call {self.calls}"


async def test_cached_readiness_reuses_a_fresh_result() -> None:
    clock, check = FakeClock(), CountingCheck()
    cached = CachedReadiness(check, ttl=1.0, clock=clock)
    assert await cached() == (True, "call 1")
    clock.now += 0.9
    assert await cached() == (True, "call 1")
    clock.now += 0.2
    assert await cached() == (False, "call 2")
    assert check.calls == 2


async def test_cached_readiness_runs_one_check_for_concurrent_probes() -> None:
    check = CountingCheck()
    check.release.clear()
    cached = CachedReadiness(check, ttl=1.0, clock=FakeClock())
    probes = [asyncio.create_task(cached()) for _ in range(20)]
    await asyncio.sleep(0)
    check.release.set()
    results = await asyncio.gather(*probes)
    assert check.calls == 1
    assert set(results) == {(True, "call 1")}


async def test_cached_readiness_times_out_a_hanging_check() -> None:
    async def hangs() -> tuple[bool, str]:
        await asyncio.Event().wait()
        return True, "never"

    ready, reason = await CachedReadiness(hangs, timeout=0.05)()
    assert not ready
    assert "did not finish" in reason


# -- server lifecycle and access log ---------------------------------------------------------------------
async def test_start_admin_server_on_port_zero(metrics: Metrics) -> None:
    server = await start_admin_server(build_admin_app(metrics, fixed(True, "ok"), version="v"), "127.0.0.1", 0)
    try:
        assert server.port > 0
        async with ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/healthz") as resp:
            assert resp.status == 200
    finally:
        await server.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


def subject_api() -> web.Application:
    async def subject(request: web.Request) -> web.Response:
        if request.match_info["subject"] == "boom":
            raise RuntimeError("keystore at postgresql://ks:hunter2@db failed")
        return web.json_response({"subject": "found"})

    api = web.Application()
    api.add_routes([web.get("/subjects/{subject}", subject)])
    return api


async def test_a_failing_handler_answers_500_json_without_its_message(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    client = await client_for(build_admin_app(metrics, fixed(True, "ok"), version="v", api=subject_api()))
    try:
        resp = await client.get(f"{API_PREFIX}/subjects/boom")
        assert resp.status == 500
        body = await resp.text()
        assert json.loads(body) == {"error": "internal error"}
    finally:
        await client.close()
    assert "hunter2" not in body
    assert "hunter2" not in caplog.text
    assert "/v1/subjects/{subject}" in caplog.text


async def test_access_log_is_off_by_default_and_names_only_the_route(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for access_log in (False, True):
        caplog.clear()
        app = build_admin_app(metrics, fixed(True, "ok"), version="v", api=subject_api())
        server = await start_admin_server(app, "127.0.0.1", 0, access_log=access_log)
        try:
            url = f"http://127.0.0.1:{server.port}{API_PREFIX}/subjects/alice?token=s3cr3t"
            async with ClientSession() as http, http.get(url) as resp:
                assert resp.status == 200
        finally:
            await server.stop()
        lines = [r.getMessage() for r in caplog.records if r.name.startswith(("proxy.admin.access", "aiohttp.access"))]
        assert not any("s3cr3t" in line or "alice" in line for line in lines)
        if access_log:
            assert any("GET /v1/subjects/{subject} 200" in line for line in lines)
        else:
            assert lines == []


# -- upstream probe ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    d: Path = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx


async def probe(handler: Handler, timeout: float = 5.0) -> tuple[bool, str]:
    """Runs the probe against ``handler`` on loopback, then waits for the handler to finish, so what the
    fake postmaster saw is complete and its failed assertions fail the test."""
    handlers: list[asyncio.Task[None]] = []

    async def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await handler(reader, writer)

    server = await asyncio.start_server(spawn, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        result = await upstream_reachable("127.0.0.1", port, timeout)
        async with asyncio.timeout(10):
            await asyncio.gather(*handlers)
        return result
    finally:
        server.close()
        await server.wait_closed()


async def test_probe_ready_when_postmaster_answers_n() -> None:
    seen: list[bytes] = []

    async def postmaster(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readexactly(8))
        writer.write(b"N")
        seen.append(await reader.read())  # the probe closes without a StartupMessage
        writer.close()

    assert await probe(postmaster) == (True, "upstream answered SSLRequest")
    assert seen == [SSL_REQUEST, b""]


async def test_probe_completes_tls_after_s(server_tls: ssl.SSLContext) -> None:
    handshakes: list[bool] = []

    async def postmaster(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(8) == SSL_REQUEST
        writer.write(b"S")
        await writer.drain()
        await writer.start_tls(server_tls)
        handshakes.append(True)
        assert await reader.read() == b""
        writer.close()

    ready, _ = await probe(postmaster)
    assert ready
    assert handshakes == [True]


async def test_probe_still_ready_when_tls_after_s_fails() -> None:
    async def postmaster(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(b"S")
        await writer.drain()
        writer.close()

    ready, _ = await probe(postmaster)
    assert ready


async def test_probe_not_ready_when_peer_closes_without_answer() -> None:
    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    ready, reason = await probe(closes)
    assert not ready
    assert "closed" in reason or "reset" in reason


async def test_probe_not_ready_when_peer_is_not_postgres() -> None:
    async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    ready, reason = await probe(http_server)
    assert not ready
    assert "0x48" in reason


async def test_probe_not_ready_when_nobody_answers_in_time() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionResetError):  # the probe aborts when it gives up
            await reader.read()
        writer.close()

    ready, reason = await probe(silent, timeout=0.1)
    assert not ready
    assert "did not answer" in reason


async def test_probe_not_ready_on_a_closed_port() -> None:
    # A bound socket that never listens refuses connections, and nothing else can take its port meanwhile.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        ready, reason = await upstream_reachable("127.0.0.1", port, 5.0)
    assert not ready
    assert reason == "upstream unreachable: connection refused"
    assert str(port) not in reason
