"""The ``pgveil`` command: serve, check, demo, and the operator subcommands.

Every subcommand takes ``--config FILE`` (default: ``$PGVEIL_CONFIG``, then ``./pgveil.yaml``).
Every failure is one message on stderr with an exit code (:mod:`proxy.cli_errors`, docs/cli.md): 0 done,
1 failed or refused, 2 invalid configuration or usage, 3 a server unreachable, 4 a missing privilege,
70 an internal error, 130 interrupted. Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from keymgmt import native
from proxy import __version__
from proxy.cli_errors import USAGE, CliError, report
from proxy.config import Config, default_config_path, load_config
from proxy.logsetup import LEVELS, set_worker, setup_logging

log = logging.getLogger("pgveil")
T = TypeVar("T")


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional at runtime
        return asyncio.run(factory())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(factory())


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="configuration file (default: $PGVEIL_CONFIG, ./pgveil.yaml)"
    )


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    path = args.config if args.config is not None else default_config_path()
    return load_config(path, overrides=overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = args.listen if len(args.listen) > 1 else args.listen[0]
    if args.upstream:
        overrides["upstream"] = args.upstream
    config = _load(args, overrides)
    if args.worker and (args.metrics_fd is None or args.handoff_fd is None):
        raise CliError("pgveil serve --worker is started by a supervisor (sessions.workers), not by hand", USAGE)
    if args.worker:
        # A worker of a supervisor (sessions.workers): the supervisor alone serves the admin API.
        config = dataclasses.replace(config, admin=dataclasses.replace(config.admin, listen=None))
        # Its lines say which worker logged them; it starts at the supervisor's level of the moment.
        set_worker(args.worker_slot)
    setup_logging((args.worker and args.log_level) or config.logging.level, config.logging.format)
    for w in config.warnings:
        log.warning("config: %s", w)
    from proxy.server import run

    run_async(
        lambda: run(
            config,
            overrides,
            worker_fds=(args.metrics_fd, args.handoff_fd) if args.worker else None,
            control_fd=args.control_fd if args.worker else None,
        )
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.cli_check import Findings, check_files, check_master_key, check_servers

    config = _load(args)
    found = Findings(warnings=list(config.warnings))
    check_master_key(config, found)
    check_files(config, found)
    if args.connect:
        run_async(lambda: check_servers(config, found))
    for w in found.warnings:
        print(f"warning: {w}")
    for n in found.notes:
        print(f"ok: {n}")
    if found.problems:
        print(f"pgveil: {config.source_path}: {len(found.problems)} problem(s):", file=sys.stderr)
        for text, _code in found.problems:
            print(f"  {text}", file=sys.stderr)
        return found.code
    print(f"configuration OK: {config.source_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging(os.environ.get("PGVEIL_LOG_LEVEL", "warning"))
    from proxy.demo import demo_config_file, run_demo

    path = demo_config_file(args.config)
    return run_async(lambda: run_demo(keep_running=args.keep_running, config_file=path))


def cmd_keystore_init(args: argparse.Namespace) -> int:
    config = _load(args)
    setup_logging(config.logging.level, config.logging.format)
    ks = config.keystore
    if ks is None or ks.dsn is None:
        raise CliError("keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set", USAGE)
    dsn, password_file = ks.dsn, ks.password_file

    async def init() -> list[str]:
        from keymgmt.keystore import init_keystore
        from proxy.cli_errors import connect

        conn = await connect("the keystore", dsn, password_file)
        try:
            return await init_keystore(conn)
        finally:
            await conn.close()

    applied = run_async(init)
    print("keystore up to date" if not applied else "applied migrations: " + ", ".join(applied))
    return 0


def cmd_schema_apply(args: argparse.Namespace) -> int:
    config = _load(args)
    setup_logging(config.logging.level, config.logging.format)
    return run_async(lambda: _schema_apply(config, dry_run=args.dry_run))


async def _schema_apply(config: Config, *, dry_run: bool) -> int:
    from proxy.cli_errors import connect
    from proxy.schema import apply_schema, plan_event_trigger, plan_schema

    service = config.service
    if service is None or service.dsn is None:
        raise CliError("service.dsn (or keystore.dsn / PGVEIL_KEYSTORE_DSN) is not set", USAGE)
    conn = await connect("the service connection", service.dsn, service.password_file)
    try:
        steps = await plan_schema(conn, config.catalog()) + await plan_event_trigger(conn)
        if not steps:
            print("schema up to date: nothing to do")
            return 0
        for step in steps:
            print(f"{'would run' if dry_run else 'running'}: {step.description}\n    {step.sql}")
        if not dry_run:
            await apply_schema(conn, steps)
            print(f"applied {len(steps)} step(s)")
    finally:
        await conn.close()
    return 0


def _with_config(args: argparse.Namespace, command: Callable[[argparse.Namespace, Config], int]) -> int:
    """Runs an inspection command (``policy explain``, ``catalog snapshot``) with the configuration
    loaded; logs only warnings, so its output is its answer."""
    config = _load(args)
    setup_logging("warning", config.logging.format)
    return command(args, config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgveil", description="PostgreSQL proxy with transparent column encryption")
    p.add_argument("--version", action="version", version=f"pgveil {__version__}\nkernels: {native.describe()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    _config_arg(s)
    s.add_argument("--listen", metavar="HOST:PORT", action="append", help="override `listen` (repeatable)")
    s.add_argument("--upstream", metavar="HOST:PORT", help="override `upstream.host` and `upstream.port`")
    s.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--metrics-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--handoff-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--worker-slot", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--log-level", choices=LEVELS, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a configuration file and print every error")
    _config_arg(c)
    c.add_argument(
        "--connect", action="store_true", help="also reach the upstream, the keystore and the service connection"
    )
    c.set_defaults(func=cmd_check)

    k = sub.add_parser("keystore", help="manage the keystore")
    ksub = k.add_subparsers(dest="keystore_command", required=True)
    ki = ksub.add_parser("init", help="create or migrate schema pgveil in the keystore database (idempotent)")
    _config_arg(ki)
    ki.set_defaults(func=cmd_keystore_init)

    sc = sub.add_parser("schema", help="prepare the application's tables for encrypted columns")
    ssub = sc.add_subparsers(dest="schema_command", required=True)
    sa = ssub.add_parser("apply", help="make new, empty protected columns bytea and add the envelope CHECK")
    _config_arg(sa)
    sa.add_argument("--dry-run", action="store_true", help="print the steps without changing anything")
    sa.set_defaults(func=cmd_schema_apply)

    from proxy import cli_admin, cli_audit, cli_policy

    cli_policy.add_parsers(sub, _config_arg, _with_config)
    cli_admin.add_parsers(sub, _config_arg)
    cli_audit.add_parsers(sub, _config_arg)

    d = sub.add_parser("demo", help="start a throwaway PostgreSQL, put pgveil in front, show what it does")
    _config_arg(d)
    d.add_argument("--keep-running", action="store_true", help="keep the demo cluster and proxy up until Ctrl-C")
    d.epilog = (
        "--config: a demo configuration like config/demo.yaml (its tables, roles and logging); the demo sets "
        "listen, upstream, admin and the keystore itself"
    )
    d.set_defaults(func=cmd_demo)

    from proxy.cli_jobs import add_job_commands
    from proxy.cli_keys import add_kek_commands

    add_job_commands(sub)
    add_kek_commands(sub)
    from proxy import cli_encrypt

    cli_encrypt.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except SystemExit:
        raise
    except BaseException as e:  # every failure: one message and its exit code (proxy.cli_errors)
        return report(e)
    return rc


if __name__ == "__main__":
    sys.exit(main())
