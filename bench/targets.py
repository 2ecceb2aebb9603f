"""The things a workload runs against: the cluster itself, pgveil (pass-through, and with protected
tables), PgBouncer.

Owns starting and stopping the middleman processes and their throwaway configuration files. A target
that cannot start raises :class:`TargetUnavailable` with the reason (and its log tail), so the run goes
on without it; it must never leave a process behind, which is why every start path ends in ``stop``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import psycopg

from bench.pgbench import Endpoint
from bench.procfs import process_tree
from proxy.config import KEYSTORE_DSN_ENV
from proxy.devcluster import CLUSTER_OS_USER, SUPERUSER, SUPERUSER_PASSWORD, DevCluster, free_port

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
# The login role of the ``*-async`` workloads: its role default is ``synchronous_commit = off``
# (:func:`bench.workloads.setup_async_role`). A role default rather than PGOPTIONS because PgBouncer
# (``ignore_startup_parameters = options``) drops the startup ``options`` silently, while every
# middleman starts the server session as this role, and PgBouncer's DISCARD ALL returns to its default.
# A throwaway cluster's password, not a secret.
ASYNC_COMMIT_ROLE = "bench_async"
ASYNC_COMMIT_PASSWORD = "pgveil-bench-async"
# Login roles of the visibility workloads: the policy of every encrypted target shows them the encrypted
# wide table masked (``partial``) or hidden; every other role sees plaintext.
MASKED_ROLE = "bench_masked"
HIDDEN_ROLE = "bench_hidden"
VISIBILITY_PASSWORD = "pgveil-bench-visibility"


class TargetUnavailable(Exception):
    """The target cannot be benchmarked in this run (not installed, failed to start)."""


class Target(Protocol):
    """A place pgbench and the drivers connect to; ``middleman_pids`` is empty for the cluster itself."""

    @property
    def name(self) -> str: ...

    @property
    def endpoint(self) -> Endpoint: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def middleman_pids(self) -> list[int]: ...

    def version(self) -> str: ...


def _cluster_endpoint(cluster: DevCluster) -> Endpoint:
    return Endpoint("127.0.0.1", cluster.port, SUPERUSER, SUPERUSER_PASSWORD)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


class DirectTarget:
    """The cluster itself: the baseline every ratio is computed against."""

    name = "direct"

    def __init__(self, cluster: DevCluster) -> None:
        self._endpoint = _cluster_endpoint(cluster)
        self._cluster = cluster

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def middleman_pids(self) -> list[int]:
        return []

    def version(self) -> str:
        try:
            return self._cluster.psql("SHOW server_version").strip()
        except subprocess.CalledProcessError:
            return "unknown"


class _ManagedProcess:
    """A middleman process with its output in a log file; stop() is idempotent."""

    def __init__(self, workdir: Path, label: str) -> None:
        self.workdir = workdir
        self.label = label
        self.log_path = workdir / f"{label}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def spawn(self, argv: list[str], *, user: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self._log_file = self.log_path.open("wb")
        # Own session: a Ctrl-C in the terminal reaches us, and we stop the middleman in order,
        # instead of it dying under a running pgbench.
        kwargs: dict[str, object] = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        if env is not None:
            kwargs["env"] = {**os.environ, **env}
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )

    def wait_ready(self, endpoint: Endpoint, timeout: float = READY_TIMEOUT_S) -> None:
        """Waits for the port to accept connections and for ``SELECT 1`` to work through it."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise TargetUnavailable(
                    f"{self.label} exited with code {self.proc.returncode} before accepting connections; "
                    f"output tail:\n{_tail(self.log_path)}"
                )
            try:
                with socket.create_connection((endpoint.host, endpoint.port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TargetUnavailable(
                        f"{self.label} did not accept connections on {endpoint.host}:{endpoint.port} "
                        f"within {timeout:.0f} s; output tail:\n{_tail(self.log_path)}"
                    ) from None
                time.sleep(0.1)
        try:
            with psycopg.connect(
                host=endpoint.host,
                port=endpoint.port,
                user=endpoint.user,
                password=endpoint.password,
                dbname=endpoint.dbname,
                sslmode="disable",
                connect_timeout=10,
            ) as conn:
                conn.execute("SELECT 1").fetchall()
        except psycopg.Error as exc:
            raise TargetUnavailable(
                f"{self.label} accepts connections but SELECT 1 through it failed "
                f"({type(exc).__name__}: {exc}); output tail:\n{_tail(self.log_path)}"
            ) from None

    def tail(self, lines: int = 15) -> str:
        return _tail(self.log_path, lines)

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.label, STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def pgveil_command() -> list[str]:
    """The ``pgveil`` entry point of the interpreter running us (the venv's), else ``-m proxy.cli``."""
    script = Path(sys.executable).parent / "pgveil"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy.cli"]


class PgveilTarget:
    """``pgveil serve`` with a minimal config: plain TCP both ways, no admin listener, no policy, no
    protected tables (so sessions take the pass-through fast path)."""

    name = "pgveil"

    def __init__(self, cluster: DevCluster, workdir: Path) -> None:
        self._dir = workdir / self.name
        self._dir.mkdir(parents=True, exist_ok=True)
        self._port = free_port()
        self._cluster_port = cluster.port
        self._endpoint = Endpoint("127.0.0.1", self._port, SUPERUSER, SUPERUSER_PASSWORD)
        self._process = _ManagedProcess(self._dir, self.name)

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def config_text(self) -> str:
        return (
            f"listen: 127.0.0.1:{self._port}\n"
            f"upstream: {{host: 127.0.0.1, port: {self._cluster_port}, tls: disable}}\n"
            "admin: {listen: null}\n"
        )

    def spawn_env(self) -> Mapping[str, str] | None:
        """Environment added to ours for the ``pgveil serve`` process."""
        return None

    def wait_ready(self) -> None:
        self._process.wait_ready(self._endpoint)

    def start(self) -> None:
        config = self._dir / "pgveil.yaml"
        config.write_text(self.config_text())
        argv = [*pgveil_command(), "serve", "--config", str(config)]
        try:
            self._process.spawn(argv, env=self.spawn_env())
        except OSError as exc:
            self.stop()
            raise TargetUnavailable(f"cannot run {argv[0]}: {exc}") from None
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._process.stop()

    def middleman_pids(self) -> list[int]:
        return self._process.pids()

    def version(self) -> str:
        try:
            from keymgmt import native
            from proxy import __version__
        except ImportError:
            return "unknown"
        return f"pgveil {__version__}, {native.IMPLEMENTATION} kernels"


class PgveilEncryptedTarget(PgveilTarget):
    """``pgveil serve`` with protected tables: a keystore in the cluster's ``postgres`` database (the
    superuser's DSN, passed in ``PGVEIL_KEYSTORE_DSN`` so it stays out of the config file and argv), a
    local master key, and ``tables`` (``schema.table`` -> column -> declared type) encrypted. Every
    session then runs the full statement model, also on tables that are not protected.

    The master key lives in the target's directory, which is the same for every instance made with the
    same ``workdir``: a setup step can fill the tables through one instance, and the benchmarked one
    decrypts them. Ready means ``/readyz`` says so (catalog read, keys loaded), not only that ``SELECT 1``
    works: before that, statements on protected tables are refused.
    """

    name = "pgveil-encrypted"
    workers = 1  # sessions.workers: processes serving sessions

    def __init__(
        self,
        cluster: DevCluster,
        workdir: Path,
        tables: Mapping[str, Mapping[str, str]],
        subjects: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """``subjects``: ``schema.table`` -> (subject kind, subject column) for tables with per-subject keys."""
        super().__init__(cluster, workdir)
        self._keystore_dsn = cluster.dsn()
        self._admin_port = free_port()
        self._tables = {name: dict(columns) for name, columns in tables.items()}
        self._subjects = dict(subjects or {})

    def _table_config(self, name: str, columns: Mapping[str, str]) -> dict[str, Any]:
        table: dict[str, Any] = {"columns": {col: {"type": typ, "encrypt": True} for col, typ in columns.items()}}
        if name in self._subjects:
            kind, column = self._subjects[name]
            table["subject"] = {"kind": kind, "column": column}
        return table

    @property
    def master_key_path(self) -> Path:
        # Shared by every encrypted target of the run: they all read the tables filled through the first.
        return self._dir.parent / "pgveil-encrypted-master.key"

    def config_data(self) -> dict[str, Any]:
        """The configuration as decoded YAML, without the keystore DSN (see :meth:`spawn_env`)."""
        return {
            "listen": f"127.0.0.1:{self._port}",
            "upstream": {"host": "127.0.0.1", "port": self._cluster_port, "tls": "disable"},
            "admin": {"listen": f"127.0.0.1:{self._admin_port}"},
            "sessions": {"workers": self.workers},
            "keystore": {"master_key": {"provider": "local", "path": str(self.master_key_path)}},
            "tables": {name: self._table_config(name, columns) for name, columns in self._tables.items()},
            # The benchmarks measure the plaintext role, except the visibility workloads' login roles.
            "roles": {
                "default": "plaintext",
                MASKED_ROLE: {f"{name}.*": "masked:partial" for name in self._tables},
                HIDDEN_ROLE: {f"{name}.*": "hidden" for name in self._tables},
            },
        }

    def config_text(self) -> str:
        # JSON is YAML; json.dumps quotes every path and name, whatever characters they hold.
        return json.dumps(self.config_data(), indent=2) + "\n"

    @property
    def keystore_environ(self) -> dict[str, str]:
        """What ``proxy.config.parse_config`` needs as ``environ`` to resolve :meth:`config_data`."""
        return {KEYSTORE_DSN_ENV: self._keystore_dsn}

    def spawn_env(self) -> Mapping[str, str] | None:
        return self.keystore_environ

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        super().wait_ready()
        url = f"http://127.0.0.1:{self._admin_port}/readyz"
        deadline = time.monotonic() + timeout
        reason = "no answer"
        while time.monotonic() < deadline:
            if not self._process.pids():
                break
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    resp.read()
                    return
            except urllib.error.HTTPError as exc:
                reason = _readyz_reason(exc.read())
            except OSError as exc:
                reason = type(exc).__name__
            time.sleep(0.2)
        raise TargetUnavailable(
            f"{self.name} did not become ready within {timeout:.0f} s ({reason}); output tail:\n{self._process.tail()}"
        )


def _readyz_reason(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return "unreadable /readyz answer"
    return str(doc.get("reason", "")) if isinstance(doc, dict) else "unreadable /readyz answer"


class PgbouncerTarget:
    """PgBouncer in session mode (1:1 like pgveil), SCRAM to the client and to the server.

    PgBouncer refuses to run as root, so as root it runs as the cluster's unprivileged OS user, and its
    files belong to that user.
    """

    name = "pgbouncer"

    def __init__(self, cluster: DevCluster, workdir: Path, pool_size: int = 600) -> None:
        self._dir = workdir / "pgbouncer"
        self._cluster_port = cluster.port
        self._port = free_port()
        self._pool_size = pool_size
        self._endpoint = Endpoint("127.0.0.1", self._port, SUPERUSER, SUPERUSER_PASSWORD)
        self._process = _ManagedProcess(self._dir, "pgbouncer")
        self._binary = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def config_text(self) -> str:
        # server_idle_timeout is short so the server connections that idle-memory opens are closed
        # soon after, and the next target's 500 connections fit under max_connections.
        return "\n".join(
            [
                "[databases]",
                f"* = host=127.0.0.1 port={self._cluster_port}",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self._port}",
                "unix_socket_dir =",
                "auth_type = scram-sha-256",
                f"auth_file = {self._dir / 'userlist.txt'}",
                "pool_mode = session",
                "max_client_conn = 1000",
                f"default_pool_size = {self._pool_size}",
                "max_db_connections = 0",
                "server_idle_timeout = 2",
                "log_connections = 0",
                "log_disconnections = 0",
                "ignore_startup_parameters = extra_float_digits,options",
                "",
            ]
        )

    def start(self) -> None:
        if self._binary is None:
            raise TargetUnavailable("pgbouncer is not installed (not on PATH, not in /usr/sbin)")
        self._dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self._dir, 0o700)
        (self._dir / "pgbouncer.ini").write_text(self.config_text())
        # A plaintext entry lets PgBouncer do SCRAM both with the client and with the server.
        (self._dir / "userlist.txt").write_text(
            f'"{SUPERUSER}" "{SUPERUSER_PASSWORD}"\n"{ASYNC_COMMIT_ROLE}" "{ASYNC_COMMIT_PASSWORD}"\n'
            f'"{MASKED_ROLE}" "{VISIBILITY_PASSWORD}"\n"{HIDDEN_ROLE}" "{VISIBILITY_PASSWORD}"\n'
        )
        user: str | None = None
        if os.geteuid() == 0:
            user = CLUSTER_OS_USER
            pw = pwd.getpwnam(user)
            for path in (self._dir, *self._dir.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        try:
            self._process.spawn([self._binary, str(self._dir / "pgbouncer.ini")], user=user)
            self._process.wait_ready(self._endpoint)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._process.stop()

    def middleman_pids(self) -> list[int]:
        return self._process.pids()

    def version(self) -> str:
        if self._binary is None:
            return "absent"
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([self._binary, "--version"], capture_output=True, text=True, check=True)
            return out.stdout.splitlines()[0].strip()
        return "unknown"


class _PgveilEncryptedVariant(PgveilEncryptedTarget):
    """pgveil-encrypted started with an implementation switch in its environment (``switch``), for that
    implementation's effect in the same run; ``kernels`` says what runs, in the report's target line."""

    switch: Mapping[str, str] = {}
    kernels = ""

    def spawn_env(self) -> Mapping[str, str] | None:
        return {**self.keystore_environ, **self.switch}

    def version(self) -> str:
        try:
            from proxy import __version__
        except ImportError:
            return "unknown"
        return f"pgveil {__version__}, {self.kernels}"


class PgveilEncryptedPythonTarget(_PgveilEncryptedVariant):
    """pgveil-encrypted forced onto the pure-Python kernels (``PGVEIL_IMPL=python``)."""

    name = "pgveil-encrypted-py"
    switch = {"PGVEIL_IMPL": "python"}
    kernels = "python kernels (PGVEIL_IMPL=python)"


class PgveilEncryptedEvpTarget(_PgveilEncryptedVariant):
    """pgveil-encrypted on the accelerator with its opens on OpenSSL's EVP (``PGVEIL_GCM=evp``) instead of
    its own AES-NI GCM."""

    name = "pgveil-encrypted-evp"
    switch = {"PGVEIL_GCM": "evp"}
    kernels = "native kernels, AES-GCM open on EVP (PGVEIL_GCM=evp)"


class PgveilEncrypted2Target(PgveilEncryptedTarget):
    """pgveil-encrypted with ``sessions.workers: 2``: the supervisor and one worker, each client placed on
    the less loaded (so the 2 benchmark clients run on both cores)."""

    name = "pgveil-encrypted-2w"
    workers = 2

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Ready, and the worker takes clients (until then the supervisor would serve both alone)."""
        super().wait_ready(timeout)
        deadline = time.monotonic() + timeout
        while "worker 1 ready" not in self._process.tail(lines=10_000):
            if time.monotonic() > deadline or not self._process.pids():
                raise TargetUnavailable(f"{self.name}: its worker did not start; output tail:\n{self._process.tail()}")
            time.sleep(0.1)
