"""``pgveil encrypt`` benchmark: how fast a live plaintext column becomes an encrypted one.

Starts a throwaway cluster, fills a table with ``--rows`` rows of one plaintext text column (about 35
bytes a value, written directly, as an application did before pgveil), then for each ``--batch-sizes``
value runs ``pgveil encrypt --throttle 0`` on a fresh copy of the table and reports the job's rate (the
values it wrote over the job's run, setup, validation, passes and swap included) and the command's
wall-clock time (process start, connections and the initial count included). No pgveil serves the
table meanwhile and nothing else writes: this is the job's own ceiling on this machine.

With ``--foreground``, it measures instead what a running migration costs the application: a ``pgveil
serve`` in front of the cluster, pgbench (TPC-B-like, through pgveil) alternately without and with a
``pgveil encrypt`` of a ``--fg-rows`` table running at its default throttle, ``--rounds`` times each,
interleaved so that drift on a shared machine hits both; the foreground's throughput with the migration as
a ratio to without it (medians), and whether each migration was still running when its round ended (a
round that outlived its migration would flatter the ratio).

Development tooling only: ``python -m bench.encrypt_existing [--rows N] [--batch-sizes 1000,2000,5000]``,
``python -m bench.encrypt_existing --foreground [--fg-rows N] [--duration S] [--rounds R] [--clients C]``.
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
from keymgmt.column_migration import DEFAULT_THROTTLE
from proxy.devcluster import SUPERUSER, SUPERUSER_PASSWORD, DevCluster, free_port, wait_for_port


async def _fill(dsn: str, table: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, email text, note text)")
        await conn.execute(
            f"INSERT INTO {table} SELECT g, 'user-' || g || '-' || md5(g::text) || '@example.com', 'n' "
            "FROM generate_series(1, $1) g",
            rows,
        )
        await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-sizes", default="1000,2000,5000")
    parser.add_argument("--foreground", action="store_true", help="measure pgbench through pgveil during migrations")
    parser.add_argument("--fg-rows", type=int, default=600_000, help="rows of each migrated table (--foreground)")
    parser.add_argument("--duration", type=int, default=6, help="seconds per pgbench round (--foreground)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds without and with a migration (--foreground)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients (--foreground)")
    args = parser.parse_args(argv)
    if args.foreground:
        return foreground(args)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp, DevCluster() as pg:
        dsn = pg.dsn()
        workdir = Path(tmp)
        tables = {f"public.bench_enc_{b}": {"columns": {"email": {"type": "text", "encrypt": True}}} for b in sizes}
        config = {
            "upstream": {"host": "127.0.0.1", "port": pg.port, "tls": "disable"},
            "keystore": {"dsn": dsn, "master_key": {"provider": "local", "path": str(workdir / "master.key")}},
            "tables": tables,
        }
        path = workdir / "pgveil.yaml"
        path.write_text(yaml.safe_dump(config))
        for b in sizes:
            table = f"bench_enc_{b}"
            asyncio.run(_fill(dsn, table, args.rows))
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "proxy.cli", "encrypt", f"public.{table}.email", "--json", "--throttle", "0",
                 "--batch-size", str(b), "--config", str(path)],
                capture_output=True, text=True, check=False, cwd=workdir,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            result = json.loads(out.stdout.splitlines()[-1])
            status = result["result"]
            print(
                f"batch {b:>5}: {status['position']['values']:,} values in {result['seconds']:.2f} s inside the "
                f"job ({status['rows_done'] / result['seconds']:,.0f} rows/s), {wall:.2f} s wall clock "
                f"({args.rows / wall:,.0f} rows/s), {status['passes']} passes"
            )
    return 0


def _cli(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=config.parent,
    )


def foreground(args: argparse.Namespace) -> int:
    """pgbench through pgveil without and with a ``pgveil encrypt`` at its default throttle, interleaved."""
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-enc-fg-"))
    cluster = DevCluster()
    serve: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        dsn = cluster.dsn()
        tables = [f"bench_fg_{i}" for i in range(args.rounds)]
        for t in tables:
            asyncio.run(_fill(dsn, t, args.fg_rows))
        keystore = {"dsn": dsn, "master_key": {"provider": "local", "path": str(workdir / "master.key")}}
        upstream = {"host": "127.0.0.1", "port": cluster.port, "tls": "disable"}
        port = free_port()
        # The serving instance does not govern the migrated tables (the configuration of a column being
        # migrated is the one the command reads; the application's pgbench tables are not governed).
        serve_config = workdir / "serve.yaml"
        serve_config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{port}",
                    "admin": {"listen": None},
                    "upstream": upstream,
                    "logging": {"level": "warning"},
                    "keystore": keystore,
                    "roles": {"default": "plaintext"},
                }
            )
        )
        encrypt_config = workdir / "pgveil.yaml"
        encrypt_config.write_text(
            yaml.safe_dump(
                {
                    "upstream": upstream,
                    "keystore": keystore,
                    "tables": {
                        f"public.{t}": {"columns": {"email": {"type": "text", "encrypt": True}}} for t in tables
                    },
                }
            )
        )
        with (workdir / "pgveil.log").open("ab") as log:
            serve = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(serve_config)],
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
        jobs: list[dict[str, Any]] = []
        for t in tables:
            without.append(run_pgbench(pgbench, endpoint, workload, args.duration, workdir).summary.tps)
            proc = _cli(encrypt_config, "encrypt", f"public.{t}.email", "--json")  # its default throttle
            time.sleep(1.0)  # process start-up and setup: let the backfill begin
            with_job.append(run_pgbench(pgbench, endpoint, workload, args.duration, workdir).summary.tps)
            outlasted = proc.poll() is None
            out, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                print(err, file=sys.stderr)
                return 1
            result = json.loads(out.splitlines()[-1])
            jobs.append({"outlasted": outlasted, "seconds": result["seconds"], "rows": result["result"]["rows_done"]})
        base, loaded = statistics.median(without), statistics.median(with_job)
        throttle = "none (as fast as the database allows)" if not DEFAULT_THROTTLE else f"{DEFAULT_THROTTLE:,} rows/s"
        print(
            f"foreground pgbench (TPC-B-like, scale 10, {args.clients} clients, -M prepared, through pgveil), "
            f"{args.rounds} x {args.duration} s interleaved; default throttle of pgveil encrypt: {throttle}"
        )
        print(f"  without a migration: {', '.join(f'{x:,.0f}' for x in without)} tps (median {base:,.0f})")
        print(f"  while pgveil encrypt migrates {args.fg_rows:,} rows: {', '.join(f'{x:,.0f}' for x in with_job)} tps")
        print(f"    (median {loaded:,.0f})")
        for j in jobs:
            state = "still running when the round ended" if j["outlasted"] else "FINISHED BEFORE the round ended"
            print(
                f"  migration: {j['rows']:,} rows in {j['seconds']:.1f} s "
                f"({j['rows'] / j['seconds']:,.0f} rows/s), {state}"
            )
        pairs = [w / b for b, w in zip(without, with_job, strict=True)]
        print(f"  ratio with/without: {loaded / base:.2f} (medians); per adjacent pair of rounds:")
        print(f"    {', '.join(f'{r:.2f}' for r in pairs)} (median {statistics.median(pairs):.2f})")
        print(f"  (cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(30)
        cluster.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
