"""A throwaway PostgreSQL cluster for the demo, the test suite and the benchmarks.

It runs the server binaries that are on the machine (``PGVEIL_PG_BIN``, then ``pg_config --bindir``,
then ``/usr/lib/postgresql/15/bin``). PostgreSQL refuses to run as root, so when we are root the cluster
belongs to an unprivileged OS user (``pgveil``, created when missing). This module is development
tooling: the proxy itself never starts a server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "pgveil-super"  # a throwaway cluster's password, not a secret
CLUSTER_OS_USER = "pgveil"
# What a non-durable cluster sets: a crash may lose or corrupt it, which a throwaway cluster can afford.
NO_DURABILITY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def find_bindir() -> Path:
    env = os.environ.get("PGVEIL_PG_BIN")
    candidates: list[Path] = [Path(env)] if env else []
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], check=True, capture_output=True, text=True)
            candidates.append(Path(out.stdout.strip()))
    for c in candidates:
        if (c / "postgres").exists() and (c / "initdb").exists():
            return c
    raise RuntimeError("PostgreSQL server binaries not found; install postgresql-15 or set PGVEIL_PG_BIN")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


@dataclass
class DevCluster:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:``port``.

    ``hba`` lines are put before the defaults, so a test can pick md5 or password auth for a role.
    ``settings`` go to postgresql.conf verbatim. By default the cluster trades durability for speed
    (``fsync``, ``synchronous_commit`` and ``full_page_writes`` off), which is what the test suite wants;
    ``durable=True`` leaves those three at PostgreSQL's defaults (all on), so that the cost of a commit is
    the one production pays, which is what a throughput ratio to a direct connection must be measured
    against.
    """

    base_dir: Path | None = None
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    hba: Sequence[str] = ()
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    bindir: Path = field(default_factory=find_bindir)
    durable: bool = False

    def __post_init__(self) -> None:
        self._owns_dir = self.base_dir is None
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pgveil-pg-"))
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "server.log"
        if not self.port:
            self.port = free_port()
        self._as_user: str | None = None
        if os.geteuid() == 0:
            self._as_user = _ensure_os_user(CLUSTER_OS_USER).pw_name
        self.started = False

    # -- process control ------------------------------------------------------------------------
    def _run(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        if self._as_user:
            argv = ["runuser", "-u", self._as_user, "--", *argv]
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]

    def _chown(self, path: Path) -> None:
        if self._as_user:
            pw = pwd.getpwnam(self._as_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> None:
        assert self.base_dir is not None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)  # noqa: S103 - the cluster owner must reach its data dir
        self._chown(self.base_dir)
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        self._chown(pwfile)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                "--pwfile", str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )  # fmt: skip
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base_dir}'",
            "password_encryption": "'scram-sha-256'",
            "max_connections": "700",
            "shared_buffers": "64MB",
            "logging_collector": "off",
        }
        if not self.durable:
            conf.update(NO_DURABILITY_SETTINGS)
        if self.ssl_cert and self.ssl_key:
            for src, name in ((self.ssl_cert, "server.crt"), (self.ssl_key, "server.key")):
                dst = self.data_dir / name
                shutil.copyfile(src, dst)
                os.chmod(dst, 0o600)
                self._chown(dst)
            conf.update({"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'"})
        conf.update(self.settings)
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# pgveil devcluster\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        hba_path = self.data_dir / "pg_hba.conf"
        default_hba = hba_path.read_text()
        hba_path.write_text("\n".join(self.hba) + "\n" + default_hba)

    def start(self) -> None:
        if not self.data_dir.exists():
            self.init()
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
             "-t", "60", "start"]
        )  # fmt: skip
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"])
            self.started = False

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- convenience ----------------------------------------------------------------------------
    def dsn(self, user: str = SUPERUSER, password: str = SUPERUSER_PASSWORD, dbname: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """Runs ``sql`` as the superuser over the cluster's Unix socket; returns unaligned output.

        Several statements in one string run in one transaction (``psql -c``)."""
        try:
            out = self._run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.base_dir), "-p", str(self.port), "-U", user, "-d", dbname, "-c", sql]
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"psql failed: {e.stderr.strip()}") from None
        return out.stdout

    def server_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def bin(self) -> Path:
        return self.bindir


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def running_cluster(**kw: object) -> Iterator[DevCluster]:
    cluster = DevCluster(**kw)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
