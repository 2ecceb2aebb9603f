"""``pgveil encrypt COLUMN`` and ``pgveil decrypt COLUMN``: move a live column between plaintext and
pgveil's encrypted ``bytea`` form, online (see docs/encrypt-existing.md).

Thin: checks the configuration (the column must be governed and configured for the target state:
``encrypt: true`` to encrypt, ``encrypt: false`` to decrypt), checks that the database column has the
declared type, builds the job's target and the per-type value conversion from ``proxy.pgtypes``, and
runs :class:`keymgmt.column_migration.ColumnMigration` with a progress bar on a terminal, a line per
tenth otherwise, or JSON lines with ``--json``. Running the command again resumes an interrupted job.
Exit codes: 0 done, 1 refused or failed, 2 invalid configuration, 130 stopped (resume by running it again).
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
from typing import Any, TextIO

from keymgmt.column_migration import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_THROTTLE,
    BatchResult,
    ColumnMigration,
    Converters,
    Direction,
    MigrationError,
    MigrationTarget,
    abort_migration,
    build_target,
    column_state,
    start_migration,
)
from keymgmt.errors import KeyManagementError
from keymgmt.jobs import JobState, JobStatus
from keymgmt.keystore import init_keystore
from proxy.cli_jobs import _load, _run, connections, render_bar
from proxy.config import Config
from proxy.pgtypes import PgTypeError, SessionFormat, UnknownDeclaredType, codec_for
from proxy.schema import constraint_name, envelope_check

# What the job's connection is set to (keymgmt.column_migration.SESSION_SETTINGS): ISO dates, UTC.
_FORMAT = SessionFormat(timezone="UTC", datestyle="ISO, MDY", intervalstyle="postgres", bytea_output="hex")
_PLACEHOLDER = "pgveil_column_placeholder"


def converters(declared_type: str) -> Converters:
    """The declared type's canonical plaintext from and to PostgreSQL's text form of a value."""
    codec = codec_for(declared_type)

    def to_canonical(text: str) -> bytes:
        try:
            return codec.canonical_from_text(text.encode(), _FORMAT)
        except PgTypeError:
            raise ValueError(f"not a valid {codec.name}") from None

    def from_canonical(canonical: bytes) -> str:
        try:
            return codec.to_text(canonical, _FORMAT).decode()
        except PgTypeError:
            raise ValueError(f"not a valid {codec.name}") from None

    return Converters(to_canonical, from_canonical)


def configured_column(
    config: Config, name: str, direction: Direction, *, require_target: bool = True
) -> tuple[str, str, str, str]:
    """(schema, table, column, declared type) of ``name`` if the configuration is ready for the migration."""
    parts = name.split(".")
    if len(parts) != 3:
        raise MigrationError(f"{name}: name the column as schema.table.column")
    for t in config.tables:
        if (t.schema, t.name) != (parts[0], parts[1]):
            continue
        for c in t.columns:
            if c.name != parts[2]:
                continue
            if require_target and direction is Direction.ENCRYPT and not c.encrypt:
                raise MigrationError(
                    f"column {name} is configured plain: set encrypt: true for it first",
                    hint="pgveil serves it as plaintext until the swap, then encrypted (docs/encrypt-existing.md)",
                )
            if require_target and direction is Direction.DECRYPT and c.encrypt:
                raise MigrationError(
                    f"column {name} is configured encrypt: true: set encrypt: false for it first",
                    hint="pgveil serves the column encrypted until the swap, then as plaintext",
                )
            return t.schema, t.name, c.name, codec_for(c.type).name
    raise MigrationError(
        f"column {name} is not in the configuration's tables: section",
        hint="add it (with encrypt: true to encrypt) so pgveil governs it before and after the migration",
    )


async def make_target(
    data_conn: Any, config: Config, name: str, direction: Direction, *, check_type: bool = True
) -> MigrationTarget:
    schema, table, column, declared = configured_column(config, name, direction, require_target=check_type)
    check = envelope_check(_PLACEHOLDER).replace(f'"{_PLACEHOLDER}"', "{col}")
    target = await build_target(data_conn, direction, schema, table, column, declared, constraint_name(column), check)
    state = await column_state(data_conn, target)
    if (
        check_type
        and state is not None
        and direction is Direction.ENCRYPT
        and not (state.is_bytea and state.has_envelope_check)
    ):
        try:
            actual = codec_for(state.type_name).name
        except UnknownDeclaredType:
            actual = state.type_name
        if actual != declared:
            raise MigrationError(
                f"column {name} is {state.type_name} in the database but declared {declared} in the configuration"
            )
    return target


class MigrationProgress:
    """A redrawn bar on a terminal; a line per tenth (and at the end of each pass) otherwise; JSON lines
    with ``json_lines`` (at most one a second, and the last)."""

    def __init__(self, stream: TextIO, *, json_lines: bool = False) -> None:
        self.stream = stream
        self.json = json_lines
        self.tty = stream.isatty() and not json_lines
        self._last = 0.0
        self._tenth = -1
        self._window: list[tuple[float, int]] = []

    def __call__(self, status: JobStatus, batch: BatchResult | None) -> None:
        now = time.monotonic()
        self._window.append((now, status.rows_done))
        self._window = [w for w in self._window if now - w[0] <= 5.0] or self._window[-1:]
        rate = None
        if len(self._window) > 1 and self._window[-1][0] > self._window[0][0]:
            rate = (self._window[-1][1] - self._window[0][1]) / (self._window[-1][0] - self._window[0][0])
        if self.json:
            if now - self._last >= 1.0 or status.state.finished:
                self._last = now
                self.stream.write(json.dumps({"progress": status.to_json(), "recent_rows_per_second": rate}) + "\n")
                self.stream.flush()
            return
        if self.tty:
            if now - self._last >= 0.1 or status.state.finished:
                self._last = now
                width = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r" + render_bar(status, width, rate).ljust(width - 1))
                self.stream.flush()
            return
        fraction = status.fraction or 0.0
        if int(fraction * 10) > self._tenth or status.state.finished:
            self._tenth = int(fraction * 10)
            pos = status.position or {}
            self.stream.write(
                f"{status.column_id}: {status.kind} {fraction * 100:.0f}%, {status.rows_done:,} values written, "
                f"{status.rows_remaining if status.rows_remaining is not None else '?'} remaining, "
                f"pass {pos.get('pass', '?')}, phase {pos.get('phase', '?')}\n"
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def summary(status: JobStatus, seconds: float) -> str:
    pos = status.position or {}
    verb = "encrypted" if status.kind == Direction.ENCRYPT.value else "decrypted"
    if status.state is JobState.DONE:
        values = pos.get("values")
        rate = status.rows_done / seconds if seconds > 0 else 0.0
        return (
            f"{status.column_id}: done: {values:,} values {verb} (an exact count, under the swap's lock: every "
            f"non-NULL value of the column), {pos.get('rows', 0):,} rows; {status.rows_done:,} values written by "
            f"the job ({status.rows_skipped:,} compare-and-set misses redone after concurrent writes) in "
            f"{seconds:.1f} s ({rate:,.0f} values/s this run)"
        )
    return f"{status.column_id}: {status.kind} job {status.job_id} is {status.state.value}" + (
        f" ({status.last_error})" if status.last_error else ""
    )


async def _migrate(config: Config, args: argparse.Namespace, direction: Direction) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with connections(config, args.dsn) as c:
        await init_keystore(c.ks)
        if args.abort:
            target = await make_target(c.data, config, args.column, direction, check_type=False)
            job_id = await abort_migration(c.ks, c.data, target)
            print(
                f"{target.column_id}: migration undone"
                + (f" (job {job_id} cancelled)" if job_id else "")
                + "; the column is as it was: set the configuration back for it"
            )
            return 0
        target = await make_target(c.data, config, args.column, direction)
        started = await start_migration(
            c.ks, c.data, target, throttle=args.throttle, batch_size=args.batch_size or DEFAULT_BATCH_SIZE
        )
        out = sys.stdout if args.json else sys.stderr
        if not args.json:
            print(
                f"{target.column_id}: {'resuming' if started.resumed else 'started'} {direction.value} job "
                f"{started.job_id}",
                file=sys.stderr,
            )
        progress = MigrationProgress(out, json_lines=args.json)
        runner = ColumnMigration(
            c.keystore,
            c.ks,
            c.data,
            started.job_id,
            converters(target.declared_type),
            throttle=args.throttle if started.resumed and args.throttle_given else None,
            batch_size=args.batch_size if started.resumed else None,
            on_progress=progress,
            stop=stop,
        )
        t0 = time.perf_counter()
        status = await runner.run()
        seconds = time.perf_counter() - t0
        progress.finish()
    if args.json:
        print(json.dumps({"result": status.to_json(), "seconds": round(seconds, 3)}))
    else:
        print(summary(status, seconds))
    if stop.is_set() and not status.state.finished:
        print("stopped: run the same command again to resume", file=sys.stderr)
        return 130
    return 0 if status.state is JobState.DONE else 1


def cmd_encrypt(args: argparse.Namespace) -> int:
    return _run(_migrate(_load(args), args, Direction.ENCRYPT))


def cmd_decrypt(args: argparse.Namespace) -> int:
    return _run(_migrate(_load(args), args, Direction.DECRYPT))


class _StoreThrottle(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.throttle_given = True


def add_parsers(sub: Any) -> None:
    """Adds ``encrypt`` and ``decrypt`` to the ``pgveil`` parser's subcommands."""
    from proxy.cli_jobs import _common

    for name, func, text in (
        ("encrypt", cmd_encrypt, "encrypt an existing plaintext column online (new bytea column, backfill, swap)"),
        ("decrypt", cmd_decrypt, "turn an encrypted column back into plaintext of its declared type, online"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("column", metavar="SCHEMA.TABLE.COLUMN")
        p.add_argument(
            "--batch-size", type=int, default=None, help=f"rows per batch, one transaction each ({DEFAULT_BATCH_SIZE})"
        )
        p.add_argument(
            "--throttle",
            type=int,
            default=DEFAULT_THROTTLE,
            action=_StoreThrottle,
            metavar="ROWS_PER_SECOND",
            help="at most this many rows per second (default 0: no limit)",
        )
        p.add_argument("--json", action="store_true", help="JSON lines: progress, then the result")
        p.add_argument(
            "--abort", action="store_true", help="undo an unfinished migration of the column (job, trigger, shadow)"
        )
        p.set_defaults(func=func, throttle_given=False)


__all__ = ["KeyManagementError", "add_parsers", "cmd_decrypt", "cmd_encrypt", "converters"]
