"""``pgveil keys rotate`` / ``keys destroy`` / ``keys versions`` and ``pgveil jobs status|run|pause|resume|cancel``.

The command line of DEK rotation and its background jobs. It turns the configuration into the plain
data :mod:`keymgmt.rotation` works on (the table, its primary key from the server's catalog, the
encrypted column, its declared type) and shows progress: a progress bar on a terminal, one line per job
otherwise, ``--json`` for machines. Keys, values and DSN passwords are never printed.

Connections: the keystore through ``keystore.dsn``, the application's tables through ``service.dsn``
(which defaults to the keystore's). When both name the same database one connection does both, so each
batch and its progress commit together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg

from keymgmt.envelope import KeyState
from keymgmt.errors import KeyManagementError
from keymgmt.jobs import JobError, JobState, JobStatus, cancel, job_status, runnable_jobs, set_paused
from keymgmt.keystore import Keystore
from keymgmt.rotation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_THROTTLE,
    BatchResult,
    ReEncryption,
    RotationTarget,
    SubjectKindReEncryption,
    column_versions,
    destroy_subject_versions,
    destroy_version,
    kind_versions,
    primary_key_of,
    rotate_columns,
    rotate_subject_kind,
    rows_under,
)
from proxy.config import Config, default_config_path, load_config
from proxy.logsetup import setup_logging

# -- from the configuration to rotation targets ----------------------------------------------------------


def encrypted_columns(config: Config) -> dict[str, tuple[str, str, str, str]]:
    """``schema.table.column`` -> (schema, table, column, declared type) of every encrypted column."""
    out: dict[str, tuple[str, str, str, str]] = {}
    for t in config.tables:
        for c in t.columns:
            if c.encrypt:
                out[f"{t.schema}.{t.name}.{c.name}"] = (t.schema, t.name, c.name, c.type)
    return out


def select_columns(config: Config, columns: Sequence[str], tables: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """The encrypted columns named by ``--column`` and ``--table``, in configuration order, each once."""
    known = encrypted_columns(config)
    chosen: list[str] = []
    for name in columns:
        if name not in known:
            raise KeyManagementError(f"{name} is not an encrypted column of the configuration (schema.table.column)")
        chosen.append(name)
    for name in tables:
        found = [c for c in known if c.rsplit(".", 1)[0] == name]
        if not found:
            raise KeyManagementError(
                f"{name} is not a table with encrypted columns in the configuration (schema.table)"
            )
        chosen.extend(found)
    if not chosen:
        raise KeyManagementError("name at least one --column schema.table.column or --table schema.table")
    return [known[c] for c in dict.fromkeys(chosen)]


def subject_kind_columns(config: Config, kind: str) -> list[tuple[str, str, str, str]]:
    """Every encrypted column of every table whose ``subject.kind`` is ``kind``, in configuration order:
    the kind's keys are shared by all of them, so a rotation of the kind re-encrypts all of them."""
    out = [
        (t.schema, t.name, c.name, c.type)
        for t in config.tables
        if t.subject is not None and t.subject.kind == kind
        for c in t.columns
        if c.encrypt
    ]
    if not out:
        kinds = sorted({t.subject.kind for t in config.tables if t.subject is not None})
        raise KeyManagementError(
            f"no table of the configuration has subject kind {kind} with encrypted columns"
            + (f" (kinds: {', '.join(kinds)})" if kinds else " (no table has tables.<t>.subject)")
        )
    return out


def refuse_subject_columns(config: Config, chosen: Sequence[tuple[str, str, str, str]]) -> None:
    """``--column`` / ``--table`` name per-column keys only: a column of a table with per-subject keys is
    sealed with its subjects' keys, which every table of the kind shares, so it is rotated by kind."""
    kinds = {(t.schema, t.name): t.subject.kind for t in config.tables if t.subject is not None}
    for schema, table, column, _declared in chosen:
        kind = kinds.get((schema, table))
        if kind is not None:
            # A column key would re-encrypt every subject's values under one key: never.
            raise KeyManagementError(
                f"{schema}.{table}.{column} has per-subject keys (tables.{schema}.{table}.subject, kind {kind}), "
                "shared by every table of the kind: rotate the kind, which re-encrypts all of its tables",
                hint=f"pgveil keys rotate --subject-kind {kind}",
            )


async def build_targets(data_conn: Any, columns: Sequence[tuple[str, str, str, str]]) -> list[RotationTarget]:
    targets = []
    for schema, table, column, declared in columns:
        pk = await primary_key_of(data_conn, schema, table)
        targets.append(RotationTarget(schema, table, column, declared, pk))
    return targets


# -- connections ---------------------------------------------------------------------------------------


@dataclass
class Connections:
    keystore: Keystore
    provider: Any  # the KEK provider (keymgmt.providers.KeyProvider)
    ks: Any  # keystore connection (job rows, claims)
    data: Any  # application database connection (the same object when both are one database)


async def _keystore(config: Config) -> Any:
    """A connection to the keystore (:func:`proxy.cli_errors.connect`: failures say where and why)."""
    from proxy.cli_errors import connect

    ks_cfg = config.keystore
    if ks_cfg is None or ks_cfg.dsn is None:
        raise KeyManagementError("keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set")
    return await connect("the keystore", ks_cfg.dsn, ks_cfg.password_file)


def _connect_kwargs(dsn: str, password_file: Any) -> dict[str, Any]:
    from proxy.encrypt.runtime import connect_kwargs

    return connect_kwargs(dsn, password_file)


@contextlib.asynccontextmanager
async def connections(config: Config, data_dsn: str | None = None) -> AsyncIterator[Connections]:
    from proxy.encrypt.runtime import provider_from_config

    ks_cfg = config.keystore
    if ks_cfg is None or ks_cfg.dsn is None:
        raise KeyManagementError("keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set")
    ks_kw = _connect_kwargs(ks_cfg.dsn, ks_cfg.password_file)
    if data_dsn is None and config.service is not None and config.service.dsn is not None:
        data_dsn = config.service.dsn
        data_kw = _connect_kwargs(data_dsn, config.service.password_file)
    else:
        data_kw = {"dsn": data_dsn or ks_cfg.dsn}
    from proxy import cli_errors

    pool = await cli_errors.create_pool("the keystore", ks_cfg.dsn, ks_cfg.password_file, min_size=1, max_size=2)
    ks_conn = await cli_errors.connect("the keystore", ks_cfg.dsn, ks_cfg.password_file)
    same = data_kw == ks_kw
    if same:
        data_conn = ks_conn
    elif data_dsn is not None and config.service is not None and data_dsn == config.service.dsn:
        data_conn = await cli_errors.connect("the service connection", data_dsn, config.service.password_file)
    else:
        data_conn = await cli_errors.connect("the application database", data_kw["dsn"])
    provider = provider_from_config(config)
    keystore = Keystore(pool, provider)
    try:
        yield Connections(keystore, provider, ks_conn, data_conn)
    finally:
        await keystore.close()
        if not same:
            await data_conn.close()
        await ks_conn.close()
        await pool.close()


# -- progress ------------------------------------------------------------------------------------------------


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


# What rows_done counts, by job kind (column migrations: keymgmt.column_migration).
_DONE_VERB = {"encrypt": "encrypted", "decrypt": "decrypted"}


def describe(status: JobStatus) -> str:
    """One line about a job, without a bar."""
    state = "interrupted" if status.interrupted else status.state.value
    parts = [
        f"{status.job_id}",
        f"{status.kind}",
        status.column_id or "-",
        f"v{status.to_version}" if status.to_version else "",
        f"generation {status.generation}" if status.generation else "",
        state,
        f"{_count(status.rows_done)} " + _DONE_VERB.get(status.kind, "re-encrypted"),
        f"{_count(status.rows_remaining)} remaining",
    ]
    if status.rows_skipped:
        parts.append(f"{status.rows_skipped:,} skipped (written meanwhile)")
    if status.rows_unreadable:
        parts.append(f"{status.rows_unreadable:,} unreadable")
    rate = status.rate_rows_per_second
    if rate is not None:
        parts.append(f"{rate:,.0f} rows/s")
    if status.last_error:
        parts.append(f"({status.last_error})")
    return "  ".join(p for p in parts if p)


def render_bar(status: JobStatus, width: int, rate: float | None = None) -> str:
    """A one-line progress bar for a terminal of ``width`` columns: bar and percentage first, so a
    narrow terminal cuts the details, never the progress."""
    fraction = status.fraction
    state = "interrupted" if status.interrupted else status.state.value
    bar_width = max(10, min(30, width // 4))
    filled = 0 if fraction is None else round(fraction * bar_width)
    pct = "   ?%" if fraction is None else f"{fraction * 100:4.0f}%"
    if status.generation is not None:
        label = f"subject kind {status.subject_kind} generation {status.generation}"
    else:
        label = f"{status.column_id or status.kind} " + (
            status.kind if status.kind in _DONE_VERB else f"v{status.to_version or '?'}"
        )
    line = f"[{'#' * filled}{'-' * (bar_width - filled)}]{pct} {label}"
    line += f" {_count(status.rows_done)}/{_count(status.rows_total)}"
    if state != "running":
        line += f" [{state}]"
    if rate:
        line += f" {rate:,.0f} rows/s"
        if status.rows_remaining and not status.state.finished:
            line += f" ETA {status.rows_remaining / rate:,.0f}s"
    return line[: max(width - 1, bar_width + 6)]


class Progress:
    """Shows a job's progress: a redrawn bar on a terminal, nothing per batch otherwise."""

    def __init__(self, stream: TextIO, *, metrics: JobMetrics | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.metrics = metrics
        self._window: list[tuple[float, int]] = []
        self._last_draw = 0.0

    def __call__(self, status: JobStatus, batch: BatchResult | None) -> None:
        now = time.monotonic()
        self._window.append((now, status.rows_done))
        self._window = [w for w in self._window if now - w[0] <= 5.0] or self._window[-1:]
        rate = None
        if len(self._window) > 1 and self._window[-1][0] > self._window[0][0]:
            rate = (self._window[-1][1] - self._window[0][1]) / (self._window[-1][0] - self._window[0][0])
        if self.metrics is not None:
            self.metrics.update(status, rate)
        if self.tty and (now - self._last_draw >= 0.1 or status.state.finished):
            self._last_draw = now
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + render_bar(status, width, rate).ljust(width - 1))
            self.stream.flush()

    def finish(self, status: JobStatus) -> None:
        if self.tty:  # end the bar's line; the summary goes to stdout
            self.stream.write("\n")
            self.stream.flush()


class JobMetrics:
    """Prometheus gauges of the jobs this process runs, served on ``--metrics-listen``.

    Labels: ``kind`` (dek, subject) and ``column`` (a column of the configuration, or a subject kind's
    scope ``pgveil.subject.<kind>``: a bounded set)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        labels = ("kind", "column")
        self.done = Gauge("pgveil_job_rows_done", "Rows a job has re-encrypted.", labels, registry=self.registry)
        self.remaining = Gauge(
            "pgveil_job_rows_remaining", "Rows a job estimates it still has to do.", labels, registry=self.registry
        )
        self.skipped = Gauge(
            "pgveil_job_rows_skipped",
            "Rows a job left alone because the application wrote them meanwhile.",
            labels,
            registry=self.registry,
        )
        self.rate = Gauge("pgveil_job_rows_per_second", "A job's recent rate.", labels, registry=self.registry)
        self.running = Gauge("pgveil_job_running", "1 while the job runs here.", labels, registry=self.registry)
        self.errors = Counter(
            "pgveil_job_errors", "Job runs that stopped on an error.", ("kind",), registry=self.registry
        )

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)

    def update(self, status: JobStatus, rate: float | None) -> None:
        labels = (status.kind, status.column_id or "")
        self.done.labels(*labels).set(status.rows_done)
        self.remaining.labels(*labels).set(status.rows_remaining or 0)
        self.skipped.labels(*labels).set(status.rows_skipped)
        self.rate.labels(*labels).set(rate or 0.0)
        self.running.labels(*labels).set(0 if status.state.finished else 1)


# -- commands ------------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config if args.config is not None else default_config_path())
    setup_logging(getattr(args, "log_level", None) or "warning", config.logging.format)
    return config


def _fail(exc: KeyManagementError) -> int:
    from proxy.cli_errors import report

    return report(exc)  # its message and hint, or the GRANTs when the server refused a privilege


def _run(coro: Any) -> int:
    from proxy.cli import run_async

    try:
        rc: int = run_async(lambda: coro)
    except KeyManagementError as exc:
        return _fail(exc)
    except (OSError, asyncpg.PostgresError) as exc:
        from proxy.cli_errors import report

        return report(exc)
    return rc


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    config = _load(args)
    return _run(_keys_rotate(config, args))


async def _keys_rotate(config: Config, args: argparse.Namespace) -> int:
    if args.subject_kind is not None:
        if args.column or args.table:
            raise KeyManagementError("--subject-kind rotates every table of the kind: give it without --column/--table")
        return await _rotate_kind(config, args, args.subject_kind)
    chosen = select_columns(config, args.column or [], args.table or [])
    refuse_subject_columns(config, chosen)
    async with connections(config, args.dsn) as c:
        targets = await build_targets(c.data, chosen)
        started = await rotate_columns(c.ks, c.provider, targets, throttle=args.throttle, batch_size=args.batch_size)
        for s in started:
            print(
                f"{s.target.column_id}: version {s.to_version} (key {s.to_key_id}) is now primary for writes;"
                f" re-encryption job {s.job_id}"
                + (f" (supersedes {', '.join(map(str, s.superseded))})" if s.superseded else "")
            )
        if args.no_run:
            print("jobs queued: run them with `pgveil jobs run`")
            return 0
        if args.background:
            _spawn_background(args, [s.job_id for s in started])
            return 0
        return await _run_jobs(c, [s.job_id for s in started], args)


async def _rotate_kind(config: Config, args: argparse.Namespace, kind: str) -> int:
    chosen = subject_kind_columns(config, kind)
    async with connections(config, args.dsn) as c:
        targets = await build_targets(c.data, chosen)
        s = await rotate_subject_kind(c.ks, kind, targets, throttle=args.throttle, batch_size=args.batch_size)
        tables = sorted({t.qualified_table for t in targets})
        print(
            f"subject kind {kind}: generation {s.generation} is now primary for writes (each subject's next write "
            f"creates its next key version); re-encryption job {s.job_id} for {', '.join(tables)}"
            + (f" (supersedes {', '.join(map(str, s.superseded))})" if s.superseded else "")
        )
        if args.no_run:
            print("job queued: run it with `pgveil jobs run`")
            return 0
        if args.background:
            _spawn_background(args, [s.job_id])
            return 0
        return await _run_jobs(c, [s.job_id], args)


def cmd_keys_destroy(args: argparse.Namespace) -> int:
    config = _load(args)
    return _run(_keys_destroy(config, args))


async def _keys_destroy(config: Config, args: argparse.Namespace) -> int:
    if args.subject_kind is not None:
        if args.column is not None or args.version is not None:
            raise KeyManagementError(
                "--subject-kind destroys the kind's old versions: give it without --column/--version"
            )
        kind = args.subject_kind
        kind_columns = subject_kind_columns(config, kind)
        async with connections(config, args.dsn) as c:
            targets = await build_targets(c.data, kind_columns)
            result = await destroy_subject_versions(c.ks, c.data, kind, targets)
        print(
            f"subject kind {kind}: destroyed {result.destroyed:,} key version(s) older than generation "
            f"{result.generation}"
        )
        if result.kept_stale:
            print(
                f"{result.kept_stale:,} subject(s) still have a current key of an older generation (shredded "
                "subjects, or ones the job has not reached): they keep it",
                file=sys.stderr,
            )
        return 0
    if args.column is None or args.version is None:
        raise KeyManagementError("name --column SCHEMA.TABLE.COLUMN and --version N, or --subject-kind KIND")
    [chosen] = select_columns(config, [args.column], [])
    refuse_subject_columns(config, [chosen])
    async with connections(config, args.dsn) as c:
        [target] = await build_targets(c.data, [chosen])
        key_id = await destroy_version(c.ks, c.data, target, args.version)
    print(f"destroyed version {args.version} of {target.column_id} (key {key_id})")
    return 0


def cmd_keys_versions(args: argparse.Namespace) -> int:
    config = _load(args)
    return _run(_keys_versions(config, args))


async def _keys_versions(config: Config, args: argparse.Namespace) -> int:
    if args.subject_kind is not None:
        return await _kind_versions(config, args, args.subject_kind)
    if args.column is None:
        raise KeyManagementError("name --column SCHEMA.TABLE.COLUMN or --subject-kind KIND")
    [chosen] = select_columns(config, [args.column], [])
    refuse_subject_columns(config, [chosen])
    async with connections(config, args.dsn) as c:
        [target] = await build_targets(c.data, [chosen])
        rows = []
        for v in await column_versions(c.ks, target.column_id):
            n = None if v.state is KeyState.DESTROYED else await rows_under(c.data, target, v.key_id)
            rows.append((v, n))
    if args.json:
        out = [
            {"version": v.version, "key_id": str(v.key_id), "state": v.state.value, "current": v.current, "rows": n}
            for v, n in rows
        ]
        print(json.dumps({"column": target.column_id, "versions": out}, indent=2))
        return 0
    for v, n in rows:
        flag = " (current)" if v.current else ""
        held = "-" if n is None else _count(n)
        print(f"{target.column_id} v{v.version} {v.key_id} {v.state.value}{flag}: {held} rows")
    return 0


async def _kind_versions(config: Config, args: argparse.Namespace, kind: str) -> int:
    chosen = subject_kind_columns(config, kind)
    async with connections(config, args.dsn) as c:
        targets = await build_targets(c.data, chosen)
        summary = await kind_versions(c.ks, c.data, kind, targets)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    print(f"subject kind {kind}: generation {summary.generation}, {summary.subjects:,} subject(s)")
    for g in summary.generations:
        print(
            f"  generation {g.generation}: {g.enabled:,} enabled ({g.current:,} current), {g.destroyed:,} destroyed;"
            f" {g.rows:,} rows"
        )
    return 0


def _spawn_background(args: argparse.Namespace, job_ids: Sequence[uuid.UUID]) -> None:
    """Starts ``pgveil jobs run JOB...`` detached from this terminal; its output goes to a log file."""
    import os
    import subprocess

    log_path = args.log_file or f"pgveil-jobs-{job_ids[0]}.log"
    argv = [sys.executable, "-m", "proxy.cli", "jobs", "run", *map(str, job_ids)]
    if args.config is not None:
        argv += ["--config", str(args.config)]
    if args.dsn is not None:
        argv += ["--dsn", args.dsn]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True, close_fds=True
        )
    finally:
        os.close(fd)
    print(f"jobs running in the background (pid {proc.pid}, log {log_path}); follow them with `pgveil jobs status`")


def cmd_jobs_run(args: argparse.Namespace) -> int:
    config = _load(args)
    return _run(_jobs_run(config, args))


async def _jobs_run(config: Config, args: argparse.Namespace) -> int:
    async with connections(config, args.dsn) as c:
        return await _run_jobs(c, [uuid.UUID(j) for j in args.job], args)


async def _run_jobs(c: Connections, job_ids: Sequence[uuid.UUID], args: argparse.Namespace) -> int:
    metrics = None
    if getattr(args, "metrics_listen", None):
        from proxy.config import parse_host_port

        addr = parse_host_port(args.metrics_listen, listening=True)
        metrics = JobMetrics()
        metrics.serve(addr.host, addr.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    kinds = {j: "dek" for j in await runnable_jobs(c.ks, "dek", job_ids)}
    kinds |= {j: "subject" for j in await runnable_jobs(c.ks, "subject", job_ids)}
    todo = list(kinds)
    if job_ids and not todo:
        for s in await job_status(c.ks, job_ids):
            print(describe(s))
        return 0
    if not todo:
        print("no re-encryption job to run")
        return 0
    rc = 0
    for job_id in todo:
        if stop.is_set():
            break
        progress = Progress(sys.stderr, metrics=metrics)
        runner_class = SubjectKindReEncryption if kinds[job_id] == "subject" else ReEncryption
        runner = runner_class(
            c.keystore,
            c.ks,
            c.data,
            job_id,
            throttle=args.throttle if getattr(args, "throttle_given", False) else None,
            batch_size=getattr(args, "batch_size_override", None),
            on_progress=progress,
            stop=stop,
        )
        try:
            status = await runner.run()
        except JobError as exc:
            if job_ids or "another runner" not in exc.message:
                raise
            print(f"job {job_id} is held by another runner: skipped", file=sys.stderr)
            continue
        except KeyManagementError:
            if metrics is not None:
                metrics.errors.labels(kinds[job_id]).inc()
            raise
        progress.finish(status)
        print(describe(status))
        if status.state is JobState.FAILED:
            rc = 1
    if stop.is_set():
        print("stopped: the jobs continue where they left off with `pgveil jobs run`", file=sys.stderr)
        return 130
    return rc


def cmd_jobs_status(args: argparse.Namespace) -> int:
    config = _load(args)
    return _run(_jobs_status(config, args))


async def _jobs_status(config: Config, args: argparse.Namespace) -> int:
    ks_cfg = config.keystore
    if ks_cfg is None or ks_cfg.dsn is None:
        raise KeyManagementError("keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set")
    conn = await _keystore(config)
    try:
        jobs = await job_status(conn, [uuid.UUID(j) for j in args.job], include_finished=not args.unfinished)
    finally:
        await conn.close()
    if args.json:
        print(json.dumps({"jobs": [j.to_json() for j in jobs]}, indent=2))
        return 0
    if not jobs:
        print("no jobs")
    tty = sys.stdout.isatty()
    width = shutil.get_terminal_size((100, 20)).columns
    for j in jobs:
        print(render_bar(j, width, j.rate_rows_per_second) if tty else describe(j))
    return 0


def cmd_jobs_pause(args: argparse.Namespace) -> int:
    return _run(_jobs_set(_load(args), args, paused=True))


def cmd_jobs_resume(args: argparse.Namespace) -> int:
    return _run(_jobs_set(_load(args), args, paused=False))


async def _jobs_set(config: Config, args: argparse.Namespace, *, paused: bool) -> int:
    conn = await _keystore(config)
    try:
        state = await set_paused(conn, uuid.UUID(args.job_id), paused)
    finally:
        await conn.close()
    print(f"job {args.job_id}: {state.value}")
    if state is JobState.PENDING:
        print("no runner holds it: continue it with `pgveil jobs run`")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    return _run(_jobs_cancel(_load(args), args))


async def _jobs_cancel(config: Config, args: argparse.Namespace) -> int:
    conn = await _keystore(config)
    try:
        await cancel(conn, uuid.UUID(args.job_id))
    finally:
        await conn.close()
    print(f"job {args.job_id}: cancelled")
    return 0


# -- argparse ------------------------------------------------------------------------------------------------


class _StoreThrottle(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.throttle_given = True


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=_path, default=None, help="configuration file (default: $PGVEIL_CONFIG, ./pgveil.yaml)"
    )
    p.add_argument("--dsn", default=None, help="the application database (default: service.dsn, then keystore.dsn)")
    p.add_argument("--log-level", default=None, help=argparse.SUPPRESS)


def _path(text: str) -> Any:
    from pathlib import Path

    return Path(text)


def _job_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    p.add_argument(
        "--throttle",
        type=int,
        default=DEFAULT_THROTTLE if defaults else None,
        action=_StoreThrottle,
        metavar="ROWS_PER_SECOND",
        help=f"at most this many rows per second, 0 for no limit (default {DEFAULT_THROTTLE})",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", default=None, help="serve the job's Prometheus metrics")


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def add_job_commands(sub: Any) -> None:
    """Adds ``keys rotate``, ``keys destroy`` and ``jobs ...`` to the ``pgveil`` parser's subcommands
    (joining a ``keys`` group that another module may have created)."""
    keys = sub.choices.get("keys")
    if keys is None:
        keys = sub.add_parser("keys", help="manage data keys")
    ksub = _subparsers(keys) or keys.add_subparsers(dest="keys_command", required=True)

    r = ksub.add_parser("rotate", help="make a new data key version primary and re-encrypt existing rows")
    _common(r)
    r.add_argument("--column", action="append", metavar="SCHEMA.TABLE.COLUMN", help="an encrypted column (repeatable)")
    r.add_argument("--table", action="append", metavar="SCHEMA.TABLE", help="every encrypted column of a table")
    r.add_argument(
        "--subject-kind",
        default=None,
        metavar="KIND",
        help="every data subject's key of this kind, re-encrypting every table of the kind (tables.<t>.subject)",
    )
    r.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per batch (one transaction each)")
    r.add_argument("--no-run", action="store_true", help="only rotate and queue the jobs (run them with `jobs run`)")
    r.add_argument("--background", action="store_true", help="run the jobs in a detached process")
    r.add_argument("--log-file", default=None, help="the detached process's log (default: ./pgveil-jobs-JOB.log)")
    _job_options(r, defaults=True)
    r.set_defaults(func=cmd_keys_rotate, throttle_given=False)

    d = ksub.add_parser("destroy", help="destroy an old data key version once no row references it")
    _common(d)
    d.add_argument("--column", default=None, metavar="SCHEMA.TABLE.COLUMN")
    d.add_argument("--version", default=None, type=int)
    d.add_argument(
        "--subject-kind",
        default=None,
        metavar="KIND",
        help="every subject key version of the kind older than its generation",
    )
    d.set_defaults(func=cmd_keys_destroy)

    v = ksub.add_parser("versions", help="a column's data key versions and how many rows each one holds")
    _common(v)
    v.add_argument("--column", default=None, metavar="SCHEMA.TABLE.COLUMN")
    v.add_argument("--subject-kind", default=None, metavar="KIND", help="a subject kind's key versions by generation")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_keys_versions)

    j = sub.add_parser("jobs", help="background jobs: re-encryption after a key rotation")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    st = jsub.add_parser("status", help="progress of every job (or the ones named)")
    _common(st)
    st.add_argument("job", nargs="*", help="job ids (default: all)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--unfinished", action="store_true", help="only jobs that are not done, failed or cancelled")
    st.set_defaults(func=cmd_jobs_status)

    ru = jsub.add_parser("run", help="run pending and interrupted jobs to completion (resumes after a crash)")
    _common(ru)
    ru.add_argument("job", nargs="*", help="job ids (default: every runnable job)")
    ru.add_argument("--batch-size", dest="batch_size_override", type=int, default=None, help="rows per batch")
    _job_options(ru, defaults=False)
    ru.set_defaults(func=cmd_jobs_run, throttle_given=False)

    for name, func, text in (
        ("pause", cmd_jobs_pause, "pause a job (its runner waits)"),
        ("resume", cmd_jobs_resume, "resume a paused job"),
        ("cancel", cmd_jobs_cancel, "cancel a job (rows done stay done)"),
    ):
        p = jsub.add_parser(name, help=text)
        _common(p)
        p.add_argument("job_id")
        p.set_defaults(func=func)
