"""TLS on both legs: clients verify the proxy's certificate, the proxy verifies PostgreSQL's, SCRAM works
across two TLS sessions (the proxy withholds SCRAM-SHA-256-PLUS), and the refusals are clean errors."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import MD5_PASSWORD, Certs, ProxyProcess, make_certs, proxy_config
from faultproxy import RawClient, startup_packet

from proxy.devcluster import DevCluster

pytestmark = pytest.mark.integration

SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def client_tls(certs: Certs, required: bool = False) -> dict[str, Any]:
    return {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "required": required}


def verify_full(pg: DevCluster, certs: Certs) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": pg.port, "tls": "verify-full", "ca_file": str(certs.ca_cert)}


@pytest.fixture(scope="module")
def tls_proxy(pg: DevCluster, certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Client TLS offered (not required) and upstream verify-full."""
    p = ProxyProcess(
        proxy_config(pg, client_tls=client_tls(certs), upstream=verify_full(pg, certs)),
        tmp_path_factory.mktemp("tls-proxy"),
    )
    p.start()
    yield p
    p.stop()


def tls_dsn(p: ProxyProcess, certs: Certs, user: str = "app", password: str | None = None, **params: str) -> str:
    """A DSN that verifies the proxy's certificate (sslmode=verify-full)."""
    if password is not None:
        dsn = p.dsn(user=user, password=password, connect_timeout="10", sslrootcert=str(certs.ca_cert), **params)
    else:
        dsn = p.dsn(user=user, connect_timeout="10", sslrootcert=str(certs.ca_cert), **params)
    return dsn.replace("sslmode=disable", "sslmode=verify-full", 1)


def upstream_ssl(conn: psycopg.Connection[Any]) -> tuple[bool, str | None]:
    row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None
    return bool(row[0]), row[1]


def test_verify_full_on_both_legs_with_scram(tls_proxy: ProxyProcess, certs: Certs) -> None:
    # channel_binding is left at libpq's default (prefer): the proxy must not offer -PLUS, which would
    # bind the client's TLS leg that PostgreSQL never sees.
    with psycopg.connect(tls_dsn(tls_proxy, certs)) as c:
        assert c.info.pgconn.ssl_in_use
        assert upstream_ssl(c)[0] is True
        assert c.execute("SELECT current_user").fetchone() == ("app",)
        row = c.execute("SELECT count(*), sum(length(repeat('y', 1000))) FROM generate_series(1, 20000)").fetchone()
        assert row == (20000, 20_000_000)
        big = c.execute("SELECT string_agg(md5(g::text), '') FROM generate_series(1, 100000) g").fetchone()
        assert big is not None
        assert len(big[0]) == 3_200_000


def test_md5_and_cleartext_over_tls(tls_proxy: ProxyProcess, certs: Certs) -> None:
    for user, password in (("md5user", MD5_PASSWORD), ("pwuser", "pw-secret")):
        with psycopg.connect(tls_dsn(tls_proxy, certs, user=user, password=password)) as c:
            assert c.info.pgconn.ssl_in_use
            assert c.execute("SELECT current_user").fetchone() == (user,)
            assert upstream_ssl(c)[0] is True


def test_plain_client_allowed_when_tls_not_required(tls_proxy: ProxyProcess) -> None:
    with psycopg.connect(tls_proxy.dsn(connect_timeout="10")) as c:
        assert not c.info.pgconn.ssl_in_use
        assert upstream_ssl(c)[0] is True  # the upstream leg is TLS whatever the client does


def test_psql_sslmode_require(tls_proxy: ProxyProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    dsn = tls_proxy.dsn().replace("sslmode=disable", "sslmode=require")
    r = subprocess.run(
        [shutil.which("psql") or "psql", "-X", "-A", "-t", "-d", dsn, "-c",
         "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", "-c", "\\conninfo"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "t"
    assert "SSL connection (protocol: TLSv1." in r.stdout


async def test_asyncpg_over_tls(tls_proxy: ProxyProcess, certs: Certs) -> None:
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    dsn = tls_proxy.dsn().replace("?sslmode=disable", "")
    conn = await asyncpg.connect(dsn, ssl=ctx, timeout=10)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        data = os.urandom(1 << 20)
        assert await conn.fetchval("SELECT $1::bytea", data) == data
    finally:
        await conn.close(timeout=10)


def test_channel_binding_works_when_both_legs_present_the_same_certificate(
    tls_proxy: ProxyProcess, certs: Certs
) -> None:
    """tls-server-end-point hashes the server certificate: when the proxy's client leg presents the very
    certificate PostgreSQL has (as here), SCRAM-SHA-256-PLUS is relayed and binding verifies end to end."""
    with psycopg.connect(tls_dsn(tls_proxy, certs, channel_binding="require")) as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_channel_binding_required_fails_cleanly_for_md5(tls_proxy: ProxyProcess, certs: Certs) -> None:
    """md5 has no channel binding; a client that insists gets a clear libpq error (no hang), and the
    proxy is unaffected."""
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(tls_dsn(tls_proxy, certs, user="md5user", password=MD5_PASSWORD, channel_binding="require"))
    with psycopg.connect(tls_proxy.dsn(connect_timeout="10")) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_scram_over_tls_with_a_different_certificate_needs_channel_binding_disabled(
    make_proxy: Any, pg: DevCluster, certs: Certs, tmp_path: Path
) -> None:
    """A documented limitation: with different certificates on the two TLS legs, -PLUS is withheld and
    libpq's default (channel_binding=prefer) answers with the 'y' flag, which PostgreSQL over TLS rejects
    as a downgrade. Clients then set channel_binding=disable (md5 and password users are unaffected)."""
    other = make_certs(tmp_path / "other")
    p = make_proxy(client_tls={"cert_file": str(other.server_cert), "key_file": str(other.server_key)},
                   upstream=verify_full(pg, certs))  # fmt: skip
    dsn = tls_dsn(p, other)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn)
    with psycopg.connect(dsn + "&channel_binding=disable") as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_client_tls_required_refuses_plaintext(make_proxy: Any, pg: DevCluster, certs: Certs) -> None:
    p = make_proxy(client_tls=client_tls(certs, required=True), upstream=verify_full(pg, certs))
    with pytest.raises(psycopg.OperationalError, match="TLS is required"):
        psycopg.connect(p.dsn(connect_timeout="10"))
    with RawClient(p.host, p.port) as raw:
        raw.send(startup_packet(user="app", database="app"))
        fields = raw.expect_fatal()
    assert fields["S"] == "FATAL"
    assert fields["C"] == "28000"
    with psycopg.connect(tls_dsn(p, certs, user="md5user", password=MD5_PASSWORD)) as c:
        assert upstream_ssl(c)[0] is True


def test_tls_handshake_then_plaintext_injection_refused(tls_proxy: ProxyProcess) -> None:
    """Bytes sent right behind SSLRequest, before the handshake, must not be accepted (CVE-2021-23214)."""
    with RawClient(tls_proxy.host, tls_proxy.port) as raw:
        raw.send(SSL_REQUEST + startup_packet(user="app", database="app"))
        fields = raw.expect_fatal()  # framing would break on a leading 'S'
    assert fields["C"] == "08P01"


def test_upstream_require(make_proxy: Any, pg: DevCluster) -> None:
    p = make_proxy(upstream={"host": "127.0.0.1", "port": pg.port, "tls": "require"})
    with psycopg.connect(p.dsn(connect_timeout="10")) as c:
        assert upstream_ssl(c)[0] is True


def test_upstream_verify_full_name_mismatch(make_proxy: Any, pg: DevCluster, certs: Certs) -> None:
    p = make_proxy(upstream={**verify_full(pg, certs), "server_name": "not-the-server.example"})
    with RawClient(p.host, p.port) as raw:
        raw.send(startup_packet(user="app", database="app"))
        fields = raw.expect_fatal()
    assert fields["C"] == "08006"
    assert f"127.0.0.1:{pg.port}" in fields["M"]
    assert "TLS" in fields["M"]


def test_upstream_verify_full_untrusted_ca(make_proxy: Any, pg: DevCluster, tmp_path: Path) -> None:
    from conftest import make_certs

    other = make_certs(tmp_path / "other-ca")
    p = make_proxy(upstream={"host": "127.0.0.1", "port": pg.port, "tls": "verify-full", "ca_file": str(other.ca_cert)})
    with pytest.raises(psycopg.OperationalError, match="TLS handshake"):
        psycopg.connect(p.dsn(connect_timeout="10"))


def test_client_without_tls_support_to_plain_proxy(proxy: ProxyProcess, certs: Certs) -> None:
    """The shared proxy has no client_tls: sslmode=require fails cleanly, prefer falls back to plaintext."""
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn(connect_timeout="10").replace("sslmode=disable", "sslmode=require"))
    with psycopg.connect(proxy.dsn(connect_timeout="10").replace("sslmode=disable", "sslmode=prefer")) as c:
        assert not c.info.pgconn.ssl_in_use
        assert upstream_ssl(c)[0] is True
