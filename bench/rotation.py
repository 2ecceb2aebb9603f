"""DEK rotation benchmark: re-encryption throughput, and what a running job costs the foreground.

Starts a throwaway cluster and a ``pgveil serve`` in front of it, fills one table with ``--rows`` rows of
one encrypted text column (sealed through pgveil's own keystore and master key, written directly), then:

1. re-encrypts them with no throttle (``pgveil jobs run --throttle 0``) and reports rows/s;
2. runs pgbench (TPC-B-like, through pgveil) alternately without and with a re-encryption job at its
   default throttle, ``--rounds`` times each, and reports the foreground's throughput with the job as a
   ratio to without it (medians of the rounds, interleaved so that drift on a shared machine hits both).

With ``--subjects S`` it measures instead the re-encryption of a subject kind (per-subject keys): one
table of ``--rows`` rows spread over S data subjects of kind ``customer`` (each row's value sealed under its
subject's key, written directly), ``pgveil keys rotate --subject-kind customer --no-run`` and ``pgveil jobs
run --throttle 0``: rows/s, including the creation of every subject's next key version; then, unless
``--rounds 0``, pgbench through pgveil without and with the kind's job at ``--throttle``, interleaved.

Development tooling only: ``python -m bench.rotation [--rows N] [--duration S] [--rounds R]``,
``python -m bench.rotation --subjects S [--rows N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from bench.pgbench import Endpoint, find_pgbench, pgbench_init, run_pgbench
from keymgmt.envelope import Subject, column_associated_data, seal
from keymgmt.keystore import Keystore
from keymgmt.providers import LocalKeyProvider
from keymgmt.rotation import DEFAULT_THROTTLE
from proxy.config import parse_config
from proxy.devcluster import SUPERUSER, SUPERUSER_PASSWORD, DevCluster, free_port, wait_for_port
from proxy.schema import apply_schema, plan_schema

TABLE = "bench_rot"
COLUMN = f"public.{TABLE}.v"
SUBJECT_TABLE = "bench_rot_subj"
SUBJECT_COLUMN = f"public.{SUBJECT_TABLE}.v"


def _cli(config: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=config.parent,
    )


def _spawn(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=config.parent,
    )


def _status(config: Path, job_id: str) -> dict[str, Any]:
    out = _cli(config, "jobs", "status", "--json", job_id)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    job: dict[str, Any] = json.loads(out.stdout)["jobs"][0]
    return job


def _rotate(config: Path) -> str:
    out = _cli(config, "keys", "rotate", "--column", COLUMN, "--no-run")
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout.split("re-encryption job ", 1)[1].split()[0]


async def _fill(dsn: str, master_key: Path, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {TABLE}")
        async with Keystore(dsn, LocalKeyProvider(master_key)) as ks:
            key = await ks.active_key(COLUMN)
        ad = column_associated_data(COLUMN)
        records = [(i, seal(key, f"person-{i}@example.com".encode(), ad)) for i in range(1, rows + 1)]
        await conn.copy_records_to_table(TABLE, records=records, columns=["id", "v"])
        await conn.execute(f"VACUUM ANALYZE {TABLE}")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--throttle", type=int, default=DEFAULT_THROTTLE, help="the job's throttle in the foreground rounds")
    p.add_argument("--subjects", type=int, default=None, help="measure a subject kind's re-encryption instead")
    args = p.parse_args(argv)
    if args.subjects is not None:
        return subject_kind(args.rows, args.subjects, args)

    workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-rot-"))
    cluster = DevCluster()
    proxy: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        dsn = cluster.dsn()
        asyncio.run(_setup_table(dsn))
        port = free_port()
        config = workdir / "pgveil.yaml"
        master_key = workdir / "master.key"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{port}",
                    "admin": {"listen": None},
                    "upstream": {"host": "127.0.0.1", "port": cluster.port, "tls": "disable"},
                    "logging": {"level": "warning"},
                    "keystore": {"dsn": dsn, "master_key": {"provider": "local", "path": str(master_key)}},
                    "tables": {f"public.{TABLE}": {"columns": {"v": {"type": "text", "encrypt": True}}}},
                    "roles": {"default": "plaintext"},
                }
            )
        )
        with (workdir / "pgveil.log").open("ab") as log:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        wait_for_port("127.0.0.1", port, timeout=30)
        time.sleep(1.0)
        pgbench = find_pgbench(cluster.bin)
        endpoint = Endpoint("127.0.0.1", port, SUPERUSER, SUPERUSER_PASSWORD)
        pgbench_init(pgbench, Endpoint("127.0.0.1", cluster.port, SUPERUSER, SUPERUSER_PASSWORD), 10)

        # 1. throughput, unthrottled
        rates = []
        for _ in range(2):
            asyncio.run(_fill(dsn, master_key, args.rows))
            job = _rotate(config)
            started = time.perf_counter()
            out = _cli(config, "jobs", "run", job, "--throttle", "0")
            seconds = time.perf_counter() - started
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            status = _status(config, job)
            assert status["rows_done"] == args.rows, status
            rates.append((args.rows / seconds, status["rate_rows_per_second"]))
        print(f"re-encryption, {args.rows:,} rows of one encrypted text column, throttle off:")
        for wall, inner in rates:
            print(
                f"  {wall:,.0f} rows/s (wall clock of `pgveil jobs run`, start-up included);"
                f" in the job {inner:,.0f} rows/s"
            )

        # 2. foreground impact at the default throttle
        asyncio.run(_fill(dsn, master_key, args.rows))
        workload = ["-c", str(args.clients), "-j", "2", "-M", "prepared"]
        without: list[float] = []
        with_job: list[float] = []
        job_rates: list[float] = []
        for _ in range(args.rounds):
            without.append(run_pgbench(pgbench, endpoint, workload, args.duration, workdir).summary.tps)
            job = _rotate(config)
            runner = _spawn(config, "jobs", "run", job, "--throttle", str(args.throttle))
            time.sleep(1.0)  # let it start
            before = _status(config, job)["rows_done"]
            t0 = time.perf_counter()
            with_job.append(run_pgbench(pgbench, endpoint, workload, args.duration, workdir).summary.tps)
            done = _status(config, job)["rows_done"]
            job_rates.append((done - before) / (time.perf_counter() - t0))
            _cli(config, "jobs", "cancel", job)
            runner.wait(60)
        base, loaded = statistics.median(without), statistics.median(with_job)
        print(
            f"foreground pgbench (TPC-B-like, scale 10, {args.clients} clients, through pgveil), "
            f"{args.rounds} x {args.duration} s interleaved:"
        )
        print(f"  without a job: {', '.join(f'{t:,.0f}' for t in without)} tps (median {base:,.0f})")
        print(
            f"  with a job at a throttle of {args.throttle:,} rows/s (default {DEFAULT_THROTTLE:,}; measured "
            f"{statistics.median(job_rates):,.0f} rows/s): {', '.join(f'{t:,.0f}' for t in with_job)} tps "
            f"(median {loaded:,.0f})"
        )
        print(f"  ratio with/without: {loaded / base:.2f}")
        print(f"  (cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        cluster.cleanup()
    return 0


def subject_kind(rows: int, subjects: int, args: argparse.Namespace) -> int:
    """Throughput of a subject kind's re-encryption job, unthrottled; then (``--rounds`` > 0) pgbench through
    pgveil without and with the kind's job at ``--throttle``, interleaved."""
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-rot-subj-"))
    cluster = DevCluster()
    proxy: subprocess.Popen[bytes] | None = None
    tables = {
        f"public.{SUBJECT_TABLE}": {
            "subject": {"kind": "customer", "column": "cid"},
            "columns": {"v": {"type": "text", "encrypt": True}},
        }
    }
    try:
        cluster.start()
        dsn = cluster.dsn()
        master_key = workdir / "master.key"
        config = workdir / "pgveil.yaml"
        port = free_port()
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{port}",
                    "admin": {"listen": None},
                    "upstream": {"host": "127.0.0.1", "port": cluster.port, "tls": "disable"},
                    "logging": {"level": "warning"},
                    "keystore": {"dsn": dsn, "master_key": {"provider": "local", "path": str(master_key)}},
                    "tables": tables,
                    "roles": {"default": "plaintext"},
                }
            )
        )
        t0 = time.perf_counter()
        asyncio.run(_fill_subjects(dsn, master_key, rows, subjects, tables))
        print(f"filled {rows:,} rows of {subjects:,} subjects in {time.perf_counter() - t0:.1f} s")
        out = _cli(config, "keys", "rotate", "--subject-kind", "customer", "--no-run")
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        job = out.stdout.split("re-encryption job ", 1)[1].split()[0]
        started = time.perf_counter()
        out = _cli(config, "jobs", "run", job, "--throttle", "0")
        seconds = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        status = _status(config, job)
        if status["state"] != "done" or status["rows_done"] != rows:
            raise RuntimeError(f"the job did not re-encrypt every row: {status}")
        print(
            f"subject kind re-encryption, {rows:,} rows of one encrypted text column over {subjects:,} subjects "
            f"(a next key version made for each), throttle off, batches of 1,000:"
        )
        print(
            f"  {rows / seconds:,.0f} rows/s (wall clock of `pgveil jobs run`, start-up included); in the job "
            f"{status['rate_rows_per_second']:,.0f} rows/s; {status['passes']} passes"
        )
        print(f"  (cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
        if args.rounds < 1:
            return 0
        with (workdir / "pgveil.log").open("ab") as log:
            proxy = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        wait_for_port("127.0.0.1", port, timeout=30)
        time.sleep(1.0)
        pgbench = find_pgbench(cluster.bin)
        pgbench_init(pgbench, Endpoint("127.0.0.1", cluster.port, SUPERUSER, SUPERUSER_PASSWORD), 10)
        endpoint = Endpoint("127.0.0.1", port, SUPERUSER, SUPERUSER_PASSWORD)
        workload = ["-c", str(args.clients), "-j", "2", "-M", "prepared"]
        without: list[float] = []
        with_job: list[float] = []
        job_rates: list[float] = []
        for _ in range(args.rounds):
            without.append(run_pgbench(pgbench, endpoint, workload, args.duration, workdir).summary.tps)
            out = _cli(config, "keys", "rotate", "--subject-kind", "customer", "--no-run")
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            job = out.stdout.split("re-encryption job ", 1)[1].split()[0]
            runner = _spawn(config, "jobs", "run", job, "--throttle", str(args.throttle))
            time.sleep(1.0)  # let it start
            before = _status(config, job)["rows_done"]
            t1 = time.perf_counter()
            with_job.append(run_pgbench(pgbench, endpoint, workload, args.duration, workdir).summary.tps)
            job_rates.append((_status(config, job)["rows_done"] - before) / (time.perf_counter() - t1))
            _cli(config, "jobs", "cancel", job)
            runner.wait(60)
        base, loaded = statistics.median(without), statistics.median(with_job)
        pairs = [w / b for b, w in zip(without, with_job, strict=True)]
        print(
            f"foreground pgbench (TPC-B-like, scale 10, {args.clients} clients, through pgveil), "
            f"{args.rounds} x {args.duration} s interleaved, with the subject kind's job:"
        )
        print(f"  without a job: {', '.join(f'{t:,.0f}' for t in without)} tps (median {base:,.0f})")
        print(
            f"  with the kind's job at a throttle of {args.throttle:,} rows/s (measured "
            f"{statistics.median(job_rates):,.0f} rows/s): {', '.join(f'{t:,.0f}' for t in with_job)} tps "
            f"(median {loaded:,.0f})"
        )
        print(f"  ratio with/without: {loaded / base:.2f} (medians); per pair {', '.join(f'{r:.2f}' for r in pairs)}")
        print(f"  (cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        cluster.cleanup()
    return 0


async def _fill_subjects(dsn: str, master_key: Path, rows: int, subjects: int, tables: dict[str, Any]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {SUBJECT_TABLE} (id int PRIMARY KEY, cid int NOT NULL, v text)")
        catalog = parse_config({"tables": tables}, base_dir=Path.cwd(), environ={}).catalog()
        await apply_schema(conn, await plan_schema(conn, catalog))
        ad = column_associated_data(SUBJECT_COLUMN)
        async with Keystore(dsn, LocalKeyProvider(master_key)) as ks:
            await ks.initialize()
            keys = [await ks.subject_key(Subject("customer", str(s).encode())) for s in range(1, subjects + 1)]
        records = [
            (i, i % subjects + 1, seal(keys[i % subjects], f"person-{i}@example.com".encode(), ad))
            for i in range(1, rows + 1)
        ]
        await conn.copy_records_to_table(SUBJECT_TABLE, records=records, columns=["id", "cid", "v"])
        await conn.execute(f"VACUUM ANALYZE {SUBJECT_TABLE}")
    finally:
        await conn.close()


async def _setup_table(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text)")
        tables = {f"public.{TABLE}": {"columns": {"v": {"type": "text", "encrypt": True}}}}
        catalog = parse_config({"tables": tables}, base_dir=Path.cwd(), environ={}).catalog()
        await apply_schema(conn, await plan_schema(conn, catalog))
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
