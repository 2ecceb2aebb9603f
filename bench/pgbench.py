"""Runs pgbench against an endpoint and parses what it reports.

Owns the pgbench command line, the parsing of its summary and of its per-transaction logs
(``-l``: ``client_id transaction_no time script_no time_epoch time_us``, time in µs or ``failed``).
Parsing is pure; :func:`run_pgbench` is the only function here that starts a process.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUN_GRACE_S = 60


class BenchError(Exception):
    """A benchmark step failed; the message says which and carries no credentials."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a client connects; password auth over TCP."""

    host: str
    port: int
    user: str
    password: str
    dbname: str = "postgres"

    def __repr__(self) -> str:
        return f"Endpoint({self.host}:{self.port}, user={self.user}, password=<{len(self.password)} chars>)"


@dataclass(frozen=True, slots=True)
class PgbenchSummary:
    """What pgbench prints on stdout at the end of a run."""

    transactions: int
    failed: int
    tps: float
    aborted_clients: int


@dataclass(frozen=True, slots=True)
class PgbenchRun:
    summary: PgbenchSummary
    latencies_us: tuple[int, ...]
    failed_in_log: int
    progress_tps: tuple[float, ...]
    exit_code: int


_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_ABORTED = re.compile(r"client \d+ aborted")
_PROGRESS = re.compile(r"^progress: [0-9.]+ s, ([0-9.]+) tps", re.MULTILINE)


def parse_summary(stdout: str, stderr: str) -> PgbenchSummary | None:
    """``None`` when pgbench printed no summary (it failed before running)."""
    processed = _PROCESSED.search(stdout)
    tps = _TPS.search(stdout)
    if processed is None or tps is None:
        return None
    failed = _FAILED.search(stdout)
    return PgbenchSummary(
        transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        tps=float(tps.group(1)),
        aborted_clients=len(_ABORTED.findall(stderr)),
    )


def parse_progress(stderr: str) -> tuple[float, ...]:
    return tuple(float(m.group(1)) for m in _PROGRESS.finditer(stderr))


def parse_transaction_log(lines: Sequence[str]) -> tuple[list[int], int]:
    """Latencies in µs of the completed transactions, and the number of failed ones."""
    latencies: list[int] = []
    failed = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        if fields[2].isdigit():
            latencies.append(int(fields[2]))
        elif fields[2] != "skipped":
            failed += 1
    return latencies, failed


def percentile(sorted_values: Sequence[int], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values))))
    return float(sorted_values[rank - 1])


def find_pgbench(bindir: Path) -> Path:
    local = bindir / "pgbench"
    if local.exists():
        return local
    found = shutil.which("pgbench")
    if found is None:
        raise BenchError(f"pgbench not found in {bindir} or on PATH")
    return Path(found)


def client_env(endpoint: Endpoint) -> dict[str, str]:
    """libpq settings for pgbench: the password stays out of argv (and so out of ``ps``)."""
    env = dict(os.environ)
    env.update(PGPASSWORD=endpoint.password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="15")
    return env


def connection_args(endpoint: Endpoint) -> list[str]:
    return ["-h", endpoint.host, "-p", str(endpoint.port), "-U", endpoint.user]


def run_pgbench(
    pgbench: Path,
    endpoint: Endpoint,
    args: Sequence[str],
    duration: int,
    workdir: Path,
) -> PgbenchRun:
    """Runs ``pgbench <args> -T duration`` with a per-transaction log in a scratch directory.

    ``args`` names the workload (``-S -M prepared -c 8 -j 2`` or ``-f script.sql ...``); this function
    adds the connection, the duration, ``--no-vacuum``, progress and the log.
    """
    logdir = Path(tempfile.mkdtemp(prefix="pgbench-log-", dir=workdir))
    try:
        argv = [
            str(pgbench), *args, "-T", str(duration), "--no-vacuum", "-P", "1",
            "-l", "--log-prefix", str(logdir / "tx"), *connection_args(endpoint), endpoint.dbname,
        ]  # fmt: skip
        log.debug("pgbench %s", " ".join(args))
        try:
            proc = subprocess.run(
                argv,
                env=client_env(endpoint),
                capture_output=True,
                text=True,
                timeout=duration * 2 + RUN_GRACE_S,
                check=False,
                cwd=workdir,
            )
        except subprocess.TimeoutExpired:
            # A target that stops answering must not hang the whole benchmark.
            raise BenchError(f"pgbench {' '.join(args)} did not finish within {duration * 2 + RUN_GRACE_S} s") from None
        summary = parse_summary(proc.stdout, proc.stderr)
        if summary is None:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise BenchError(f"pgbench {' '.join(args)} exited {proc.returncode} without results:\n{tail}")
        latencies: list[int] = []
        failed_in_log = 0
        for path in sorted(logdir.glob("tx.*")):
            with path.open() as f:
                lat, failed = parse_transaction_log(f.readlines())
            latencies.extend(lat)
            failed_in_log += failed
        latencies.sort()
        return PgbenchRun(
            summary=summary,
            latencies_us=tuple(latencies),
            failed_in_log=failed_in_log,
            progress_tps=parse_progress(proc.stderr),
            exit_code=proc.returncode,
        )
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def pgbench_init(pgbench: Path, endpoint: Endpoint, scale: int) -> None:
    proc = subprocess.run(
        [str(pgbench), "-i", "-s", str(scale), "-q", *connection_args(endpoint), endpoint.dbname],
        env=client_env(endpoint),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise BenchError(f"pgbench -i -s {scale} failed ({proc.returncode}):\n{tail}")


def pgbench_version(pgbench: Path) -> str:
    try:
        out = subprocess.run([str(pgbench), "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
