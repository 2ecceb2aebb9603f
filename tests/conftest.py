"""Shared fixtures: a throwaway PostgreSQL 15 cluster with TLS and several auth methods, and pgveil
processes in front of it.

The cluster starts once per test run (session scope). Roles: ``postgres`` (superuser, scram), ``app``
(non-superuser, scram, owns database ``app``), ``md5user`` (md5), ``pwuser`` (cleartext password).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.devcluster import DevCluster, free_port, wait_for_port

APP_PASSWORD = "app-secret"
MD5_PASSWORD = "md5-secret"
PW_PASSWORD = "pw-secret"


@dataclass(frozen=True)
class Certs:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 / localhost, made fresh for the test run."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("pgveil test CA"))
        .issuer_name(_name("pgveil test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path = directory / "server.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "server.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    return Certs(ca_path, cert_path, key_path)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def pg(certs: Certs) -> Iterator[DevCluster]:
    cluster = DevCluster(
        ssl_cert=certs.server_cert,
        ssl_key=certs.server_key,
        hba=[
            "host all md5user 127.0.0.1/32 md5",
            "host all pwuser 127.0.0.1/32 password",
        ],
        settings={"log_statement": "'all'", "log_min_messages": "warning"},
    )
    try:
        cluster.start()
        cluster.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        cluster.psql("CREATE DATABASE app OWNER app")
        cluster.psql(
            f"""
            SET password_encryption = 'md5';
            CREATE ROLE md5user LOGIN PASSWORD '{MD5_PASSWORD}';
            SET password_encryption = 'scram-sha-256';
            CREATE ROLE pwuser LOGIN PASSWORD '{PW_PASSWORD}';
            GRANT ALL ON DATABASE app TO md5user, pwuser;
            """
        )
        cluster.psql("GRANT ALL ON SCHEMA public TO PUBLIC", dbname="app")
        yield cluster
    finally:
        cluster.cleanup()


@dataclass
class ProxyProcess:
    """``pgveil serve`` in a subprocess, as an operator would run it."""

    config: dict[str, Any]
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    admin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "pgveil.log"
        if not self.port:
            self.port = free_port()
        self.config.setdefault("listen", f"{self.host}:{self.port}")
        admin = self.config.setdefault("admin", {})
        if admin.get("listen", "") is not None and not admin.get("listen"):
            self.admin_port = free_port()
            while self.admin_port == self.port:  # both ports were free, so the OS may hand out one twice
                self.admin_port = free_port()
            admin["listen"] = f"127.0.0.1:{self.admin_port}"
        self.config_path = self.workdir / "pgveil.yaml"
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self) -> ProxyProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, timeout=20)
        except OSError:
            self.stop()
            raise RuntimeError(f"pgveil did not start:\n{self.logs()}") from None
        return self

    def dsn(self, user: str = "app", password: str = APP_PASSWORD, dbname: str = "app", **params: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}?sslmode=disable{extra}"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def proxy_config(pg: DevCluster, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstream": {"host": "127.0.0.1", "port": pg.port, "tls": "disable"},
        "sessions": {"shutdown_timeout": 5, "track_statements": "always"},
        "logging": {"level": "info"},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def proxy(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One pgveil shared by the read-mostly driver tests (upstream TLS: prefer)."""
    p = ProxyProcess(
        proxy_config(pg, upstream={"host": "127.0.0.1", "port": pg.port, "tls": "prefer"}),
        tmp_path_factory.mktemp("proxy"),
    )
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def light_proxy(pg: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A pgveil on the pass-through fast path (no protected tables, statement tracking ``auto``)."""
    p = ProxyProcess(
        proxy_config(pg, sessions={"shutdown_timeout": 5, "track_statements": "auto"}),
        tmp_path_factory.mktemp("light-proxy"),
    )
    p.start()
    yield p
    p.stop()


@pytest.fixture
def make_proxy(tmp_path: Path, pg: DevCluster) -> Iterator[Any]:
    """Starts a dedicated pgveil for one test: ``make_proxy(**config_overrides)``."""
    started: list[ProxyProcess] = []

    def factory(**overrides: Any) -> ProxyProcess:
        p = ProxyProcess(proxy_config(pg, **overrides), tmp_path / f"proxy{len(started)}")
        started.append(p)
        return p.start()

    yield factory
    for p in started:
        p.stop()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
