"""``pgveil encrypt`` benchmark: how fast a live plaintext column becomes an encrypted one.

Starts a throwaway cluster, fills a table with ``--rows`` rows of one plaintext text column (about 35
bytes a value, written directly, as an application did before pgveil), then for each ``--batch-sizes``
value runs ``pgveil encrypt --throttle 0`` on a fresh copy of the table and reports the job's rate (the
values it wrote over the job's run, setup, validation, passes and swap included) and the command's
wall-clock time (process start, connections and the initial count included). No pgveil serves the
table meanwhile and nothing else writes: this is the job's own ceiling on this machine.

Development tooling only: ``python -m bench.encrypt_existing [--rows N] [--batch-sizes 1000,2000,5000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import yaml

from proxy.devcluster import DevCluster


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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
