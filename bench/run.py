"""Runs pgveil's benchmarks and prints the results as a Markdown table.

Usage (from the repository root)::

    .venv/bin/python -m bench.run                      # everything: 10 s per run, 3 rounds
    .venv/bin/python -m bench.run --quick              # smoke run: 2 s per run, 2 rounds
    .venv/bin/python -m bench.run --only wide-fetch,idle-memory --targets direct,pgveil
    .venv/bin/python -m bench.run --duration 30 --rounds 5 --json results.json
    .venv/bin/python -m bench.run --profile            # where pgveil's CPU goes in wide-fetch-encrypted

It starts a throwaway PostgreSQL cluster (:class:`proxy.devcluster.DevCluster`) with PostgreSQL's default
durability (``fsync``, ``synchronous_commit``, ``full_page_writes`` on), so a commit costs what it costs
in production and a middleman's ratio on a write workload is measured against that; the ``*-async``
insert workloads turn ``synchronous_commit`` off for their own sessions, the CPU-bound view. It loads
``pgbench -i -s 10`` and the workloads' tables, starts the targets (``direct``: the cluster; ``pgveil``:
``pgveil serve`` with a minimal config; ``pgveil-encrypted``: pgveil with a keystore and the ``*_enc``
tables' columns encrypted, on the native accelerator when it is built; ``pgveil-encrypted-py``: the same
forced onto the pure-Python kernels with ``PGVEIL_IMPL=python``; ``pgveil-encrypted-evp``: the
accelerator with its AES-GCM opens on OpenSSL's EVP (``PGVEIL_GCM=evp``), on the encrypted wide fetch;
``pgbouncer``: session pooling, SCRAM,
when installed) and runs every workload on each of its targets, interleaved: each round visits the
targets in a rotated order, so drift of the machine during the run (thermal, page cache, autovacuum)
falls on all targets alike. A target that cannot start is skipped with its reason and log tail.
Everything is torn down at the end, on errors and on Ctrl-C (which still prints what was measured so
far).

Columns: tx/s is the median over rounds; rows/s is tx/s times the rows each transaction fetches; p50/p99
are per-transaction latencies from pgbench's transaction log over all rounds; failed counts failed
transactions (expected 0); "vs direct" is the row's throughput over direct's on the same workload (the
encrypted and pgcrypto rows divide by direct's plaintext counterpart: wide-fetch, insert-single,
insert-single-async); CPU µs/tx is the middleman's utime+stime over the runs divided by their
transactions; KiB/idle conn is the middleman's RSS growth with 500 idle client connections, per
connection. The header lines name the server's durability settings as the server reports them; below
the table, each workload's description says what its rows measure and what their ratio divides by.
``--only`` adds the workloads those ratios divide by, and the target they run on, so a ratio always
compares runs of the same cluster and the same minutes.

``--profile [WORKLOAD]`` prints no table: it runs one workload (default ``wide-fetch-encrypted``) once,
for ``--duration`` seconds, on its pgveil target (or the one ``--targets`` names) under py-spy
(:mod:`bench.profiling`) and prints the top 25 functions by their share of the proxy's CPU.

Workloads live in :mod:`bench.workloads`; this module owns the command line, the order of runs, the
CPU accounting around each run and the teardown. It must not interpret a workload's results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from bench.pgbench import BenchError, find_pgbench, pgbench_version
from bench.procfs import cpu_seconds
from bench.profiling import (
    DEFAULT_RATE_HZ,
    TOP_N,
    parse_collapsed,
    py_spy_record,
    render_profile,
    repository_roots,
    summarise,
)
from bench.report import RunRecord, aggregate, render_markdown, to_json
from bench.targets import (
    ASYNC_COMMIT_ROLE,
    DirectTarget,
    PgbouncerTarget,
    PgveilTarget,
    Target,
    TargetUnavailable,
)
from bench.workloads import (
    ALL_TARGETS,
    PGBENCH_SCALE,
    WORKLOADS,
    BenchContext,
    SetupFn,
    Workload,
    encrypted_target,
    select_workloads,
)
from proxy.devcluster import DevCluster

log = logging.getLogger("bench.run")

QUICK_DURATION_S = 2
QUICK_ROUNDS = 2
PROFILE_DEFAULT_WORKLOAD = "wide-fetch-encrypted"
PROFILABLE_TARGETS = ("pgveil-encrypted", "pgveil-encrypted-py", "pgveil-encrypted-evp", "pgveil")
DURABILITY_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")
CLUSTER_SETTINGS = {
    # 500 idle connections through a 1:1 middleman, plus pgbench and a margin.
    "max_connections": "700",
    # pgbench scale 10 (~160 MB) and the wide tables stay in shared buffers.
    "shared_buffers": "256MB",
    "autovacuum": "off",
}


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    epilog = "workloads:\n" + "\n".join(f"  {w.name:32} {w.description}" for w in WORKLOADS)
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s per run, 2 rounds (unless given)")
    p.add_argument("--duration", type=int, metavar="SECONDS", help="seconds per workload run (default 10)")
    p.add_argument("--rounds", type=int, metavar="N", help="interleaving rounds (default 3)")
    p.add_argument("--only", type=_names, metavar="NAME,...", help="run only these workloads")
    p.add_argument("--targets", type=_names, metavar="NAME,...", help=f"only these targets ({', '.join(ALL_TARGETS)})")
    p.add_argument("--idle-connections", type=int, default=500, metavar="N", help="for idle-memory")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--profile",
        nargs="?",
        const=PROFILE_DEFAULT_WORKLOAD,
        metavar="WORKLOAD",
        help=f"instead of the table: run WORKLOAD (default {PROFILE_DEFAULT_WORKLOAD}) once on its pgveil target"
        f" under py-spy and print the top {TOP_N} functions by share of the proxy's CPU",
    )
    p.add_argument("--profile-rate", type=int, default=DEFAULT_RATE_HZ, metavar="HZ", help="py-spy samples/s")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native: show C and Rust frames too")
    p.add_argument(
        "--profile-raw", type=Path, metavar="FILE", help="also keep py-spy's collapsed stacks (flame graph input)"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else 10
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else 3
    if args.duration < 1 or args.rounds < 1 or args.idle_connections < 1 or args.profile_rate < 1:
        p.error("--duration, --rounds, --idle-connections and --profile-rate must be positive")
    if args.profile is not None and args.only:
        p.error("--profile names its one workload; --only does not apply")
    unknown = set(args.targets or ()) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL_TARGETS)}")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Handled like Ctrl-C: unwinds through the ExitStack, so a killed benchmark still stops its
    # processes, and reports what it measured.
    raise KeyboardInterrupt


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rotated(targets: Sequence[Target], round_index: int) -> list[Target]:
    """Round r starts with target r (mod n), so every target is first, and last, equally often."""
    if not targets:
        return []
    k = round_index % len(targets)
    return [*targets[k:], *targets[:k]]


def run_once(ctx: BenchContext, workload: Workload, target: Target, round_no: int) -> RunRecord:
    """One workload on one target, with the middleman's CPU time measured around it."""
    if target.name != "direct" and not target.middleman_pids():
        return RunRecord(workload.name, target.name, round_no, None, 0.0, None, "target process is not running")
    if workload.fresh_target and target.name != "direct":
        target.stop()
        try:
            target.start()
        except TargetUnavailable as exc:
            return RunRecord(workload.name, target.name, round_no, None, 0.0, None, f"restart failed: {exc}")
    if workload.before_run is not None:
        workload.before_run(ctx)
    if workload.check is not None:
        try:
            workload.check(ctx, target)
        except BenchError as exc:
            return RunRecord(workload.name, target.name, round_no, None, 0.0, None, str(exc))
    pids = target.middleman_pids()
    cpu_before = cpu_seconds(pids) if pids else None
    started = time.monotonic()
    try:
        measurement = workload.run(ctx, target)
    except BenchError as exc:
        return RunRecord(workload.name, target.name, round_no, None, time.monotonic() - started, None, str(exc))
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(pids) - cpu_before if cpu_before is not None else None
    return RunRecord(workload.name, target.name, round_no, measurement, elapsed, cpu)


def _describe(record: RunRecord) -> str:
    m = record.measurement
    if m is None:
        return f"ERROR {record.error.splitlines()[0] if record.error else ''}"
    if m.tps is not None:
        return f"{m.tps:,.1f} tx/s, {m.failed} failed{f' ({m.note})' if m.note else ''}"
    if m.idle_kib_per_conn is not None:
        return f"{m.idle_kib_per_conn:.1f} KiB/idle conn ({m.note})"
    return m.note


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return _main(args)
    except BenchError as exc:
        log.error("benchmark aborted: %s", exc)
        return 2


def run_setups(ctx: BenchContext, workloads: Sequence[Workload]) -> None:
    """Each distinct setup once, in the order the workloads need them."""
    done: list[SetupFn] = []
    for workload in workloads:
        for setup in workload.setup:
            if setup not in done:
                log.info("setup: %s", setup.__name__)
                setup(ctx)
                done.append(setup)


def start_targets(candidates: Sequence[Target], stack: contextlib.ExitStack, skipped: dict[str, str]) -> list[Target]:
    """Starts what can start; the rest go to ``skipped`` with the reason."""
    started: list[Target] = []
    for target in candidates:
        log.info("starting target %s", target.name)
        try:
            target.start()
        except TargetUnavailable as exc:
            log.warning("target %s skipped: %s", target.name, exc)
            skipped[target.name] = str(exc)
            continue
        stack.callback(target.stop)
        started.append(target)
    return started


def run_rounds(
    ctx: BenchContext,
    workloads: Sequence[Workload],
    targets: Sequence[Target],
    rounds: int,
    records: list[RunRecord],
) -> None:
    """Every workload on every target, round after round, appending to ``records`` as it goes, so an
    interrupted run keeps what it measured."""
    for round_index in range(rounds):
        order = rotated(targets, round_index)
        for workload in workloads:
            if workload.max_rounds is not None and round_index >= workload.max_rounds:
                continue
            for target in order:
                if target.name not in workload.targets:
                    continue
                record = run_once(ctx, workload, target, round_index + 1)
                records.append(record)
                log.info(
                    "round %d/%d %s on %s: %s",
                    round_index + 1,
                    rounds,
                    workload.name,
                    target.name,
                    _describe(record),
                )


def _wanted_targets(args: argparse.Namespace, workloads: Sequence[Workload]) -> list[str]:
    """The targets the workloads run on, as ``--targets`` restricts them, plus the targets of the rows
    the ratios divide by."""
    wanted = [t for t in ALL_TARGETS if any(t in w.targets for w in workloads)]
    if args.targets:
        baselines = {w.ratio_baseline[1] for w in workloads}
        wanted = [t for t in wanted if t in args.targets or t in baselines]
    return wanted


def _start_cluster(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[BenchContext, DirectTarget]:
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-"))
    stack.callback(shutil.rmtree, workdir, True)
    # Traversable by the unprivileged user PgBouncer runs as; its own files stay private to it.
    os.chmod(workdir, 0o711)
    cluster = DevCluster(settings=CLUSTER_SETTINGS, durable=True)
    stack.callback(cluster.cleanup)
    log.info("starting PostgreSQL on 127.0.0.1:%d", cluster.port)
    cluster.start()
    direct = DirectTarget(cluster)
    ctx = BenchContext(
        cluster=cluster,
        direct=direct.endpoint,
        pgbench=find_pgbench(cluster.bindir),
        workdir=workdir,
        duration=args.duration,
        idle_connections=args.idle_connections,
    )
    return ctx, direct


def _target_factories(ctx: BenchContext, direct: DirectTarget) -> dict[str, Callable[[], Target]]:
    return {
        "direct": lambda: direct,
        "pgveil": lambda: PgveilTarget(ctx.cluster, ctx.workdir),
        "pgveil-encrypted": lambda: encrypted_target(ctx),
        "pgveil-encrypted-py": lambda: encrypted_target(ctx, python=True),
        "pgveil-encrypted-evp": lambda: encrypted_target(ctx, evp=True),
        "pgveil-encrypted-2w": lambda: encrypted_target(ctx, workers=2),
        "pgbouncer": lambda: PgbouncerTarget(ctx.cluster, ctx.workdir),
    }


def _meta(
    args: argparse.Namespace, ctx: BenchContext, direct: DirectTarget, targets: Sequence[Target]
) -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}, Linux {platform.release()}",
        "server": f"PostgreSQL {direct.version()}",
        "durability": _durability(ctx),
        "clients": f"{pgbench_version(ctx.pgbench)}, asyncpg (idle-memory)",
        "targets": ", ".join(f"{t.name} ({t.version()})" for t in targets),
        "runs": f"{args.duration} s per run, {args.rounds} rounds interleaved, pgbench scale {PGBENCH_SCALE}",
    }


def _durability(ctx: BenchContext) -> str:
    """The server's durability settings as it reports them, not as we meant to set them."""
    names = ", ".join(f"'{n}'" for n in DURABILITY_SETTINGS)
    try:
        out = ctx.cluster.psql(f"SELECT name, setting FROM pg_settings WHERE name IN ({names})")
    except RuntimeError as exc:
        return f"unknown ({exc})"
    values = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    server = ", ".join(f"{n}={values.get(n, '?')}" for n in DURABILITY_SETTINGS)
    return (
        f"{server}; *-async workloads: synchronous_commit=off for their login role {ASYNC_COMMIT_ROLE}"
        " (checked through the target before each run)"
    )


def _main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    if args.profile is not None:
        return _profile(args)
    workloads = select_workloads(args.only)
    wanted = _wanted_targets(args, workloads)

    records: list[RunRecord] = []
    skipped: dict[str, str] = {}
    interrupted = False
    with contextlib.ExitStack() as stack:
        ctx, direct = _start_cluster(args, stack)
        run_setups(ctx, workloads)
        factories = _target_factories(ctx, direct)
        targets = start_targets([factories[name]() for name in wanted], stack, skipped)
        meta = _meta(args, ctx, direct, targets)
        try:
            run_rounds(ctx, workloads, targets, args.rounds, records)
        except KeyboardInterrupt:
            log.warning("interrupted: reporting what was measured so far")
            interrupted = True

    rows = aggregate(records, workloads, ALL_TARGETS)
    print(render_markdown(rows, meta, skipped), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(rows, records, meta, skipped), indent=2) + "\n")
        log.info("wrote %s", args.json)
    if interrupted:
        return 130
    return 1 if any(r.error for r in records) else 0


def _profile_target(args: argparse.Namespace, workload: Workload) -> str:
    candidates = [t for t in PROFILABLE_TARGETS if t in workload.targets]
    if args.targets:
        candidates = [t for t in candidates if t in args.targets]
    if not candidates:
        raise BenchError(
            f"{workload.name} runs on {', '.join(workload.targets)}; only a pgveil target can be profiled"
            + (f" (and --targets allows {', '.join(args.targets)})" if args.targets else "")
        )
    return candidates[0]


def _profile(args: argparse.Namespace) -> int:
    """One run of one workload under py-spy; prints the summary (see :mod:`bench.profiling`)."""
    workload = next((w for w in WORKLOADS if w.name == args.profile), None)
    if workload is None:
        raise BenchError(f"unknown workload {args.profile}; known: {', '.join(w.name for w in WORKLOADS)}")
    target_name = _profile_target(args, workload)
    with contextlib.ExitStack() as stack:
        ctx, direct = _start_cluster(args, stack)
        run_setups(ctx, [workload])
        skipped: dict[str, str] = {}
        targets = start_targets([_target_factories(ctx, direct)[target_name]()], stack, skipped)
        if not targets:
            raise BenchError(f"{target_name} did not start: {skipped.get(target_name, '')}")
        (target,) = targets
        if workload.before_run is not None:
            workload.before_run(ctx)
        if workload.check is not None:
            workload.check(ctx, target)
        pids = target.middleman_pids()
        output = ctx.workdir / "py-spy.txt"
        log.info("profiling %s on %s (pid %d) for %d s", workload.name, target.name, pids[0], args.duration)
        with py_spy_record(pids[0], output, rate=args.profile_rate, native=args.profile_native):
            cpu_before = cpu_seconds(pids)
            started = time.monotonic()
            measurement = workload.run(ctx, target)
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(pids) - cpu_before
        raw = output.read_text()
        if args.profile_raw is not None:
            args.profile_raw.write_text(raw)
        summary = summarise(parse_collapsed(raw), repository_roots())
        meta = _meta(args, ctx, direct, [target])
        del meta["runs"]
        meta["workload"] = f"{workload.name}: {workload.description}"
        meta["run"] = (
            f"{elapsed:.1f} s, {measurement.tps or 0:,.1f} tx/s under the profiler, {measurement.failed} failed"
        )
        meta["proxy CPU"] = f"{cpu:.2f} s ({100 * cpu / elapsed:.0f}% of one core)" if elapsed else "n/a"
        if measurement.transactions:
            meta["proxy CPU"] += f", {cpu / measurement.transactions * 1e6:.0f} µs per transaction"
        idle = summary.idle_samples
        meta["py-spy"] = (
            f"{summary.samples} non-idle samples at {args.profile_rate} Hz"
            f" (~{summary.samples / args.profile_rate:.2f} s of CPU){', native frames' if args.profile_native else ''}"
            + (f", {idle} samples waiting in the event loop's poll left out" if idle else "")
        )
    print(render_profile(summary, meta), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
