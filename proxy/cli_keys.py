"""``pgveil keys rotate-kek``, ``keys destroy-kek VERSION`` and ``keys list-keks``: the KEK's life cycle.

Thin: parses arguments, builds the key providers from the configuration, opens one keystore
connection and calls :mod:`keymgmt.kek_rotation`, which does the work. Exit codes as for every
``pgveil`` command: 0 done, 1 refused or failed (the message says why), 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keymgmt.errors import KeyManagementError
from keymgmt.kek_rotation import (
    DEFAULT_BATCH_SIZE,
    KekInfo,
    RotationProgress,
    destroy_kek,
    list_keks,
    rotate_kek,
)
from keymgmt.keystore import init_keystore
from keymgmt.providers import KeyProvider
from proxy.config import Config, load_config
from proxy.logsetup import setup_logging


def _load(args: argparse.Namespace) -> Config:
    from proxy.cli import _load as load

    config = load(args)
    setup_logging(config.logging.level, config.logging.format)
    return config


def _run(args: argparse.Namespace, work: Callable[[Any, Config], Any]) -> int:
    from proxy.cli import run_async
    from proxy.cli_errors import connect

    config = _load(args)
    if config.keystore is None or config.keystore.dsn is None:
        print("pgveil: keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set", file=sys.stderr)
        return 2
    keystore = config.keystore

    async def main() -> int:
        conn = await connect("the keystore", keystore.dsn or "", keystore.password_file)
        try:
            await init_keystore(conn)
            rc: int = await work(conn, config)
            return rc
        except KeyManagementError as exc:
            from proxy.cli_errors import report

            return report(exc)  # its message and hint, or the GRANTs when the server refused a privilege
        finally:
            await conn.close()

    return run_async(main)


def _providers(config: Config) -> KeyProvider:
    from proxy.encrypt.runtime import provider_from_config

    return provider_from_config(config)


class _Progress:
    """A progress bar on a terminal; a line per tenth of the work otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.last_tenth = -1

    def __call__(self, p: RotationProgress) -> None:
        fraction = p.done / p.total if p.total else 1.0
        if self.tty:
            bar = "#" * int(30 * fraction)
            self.stream.write(f"\rre-wrapping [{bar:<30}] {p.done}/{p.total} keys")
            self.stream.flush()
        elif int(10 * fraction) > self.last_tenth:
            self.last_tenth = int(10 * fraction)
            print(f"re-wrapped {p.done}/{p.total} keys", file=self.stream, flush=True)

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


def cmd_rotate_kek(args: argparse.Namespace) -> int:
    async def work(conn: Any, config: Config) -> int:
        provider = _providers(config)
        target = _providers(load_config(args.to_config)) if args.to_config is not None else None
        progress = _Progress(sys.stdout)
        try:
            result = await rotate_kek(
                conn, provider, target=target, batch_size=args.batch_size, pause=args.pause, on_progress=progress
            )
        finally:
            progress.end()
        rate = result.rewrapped / result.seconds if result.seconds > 0 else 0.0
        print(
            f"{'resumed' if result.resumed else 'started'} KEK rotation {result.job_id}: re-wrapped "
            f"{result.rewrapped} keys in {result.seconds:.2f} s ({rate:.0f} keys/s); "
            f"primary KEK is version {result.to_version} ({result.to_kek_id})"
        )
        if result.remaining:
            print(
                f"pgveil: {result.remaining} keys are still wrapped under older KEKs (created meanwhile by a "
                "proxy whose key provider does not hold the new KEK?); run pgveil keys rotate-kek again",
                file=sys.stderr,
            )
            return 1
        print("every key is wrapped under the primary KEK; older versions can be destroyed (keys destroy-kek)")
        return 0

    return _run(args, work)


def cmd_destroy_kek(args: argparse.Namespace) -> int:
    async def work(conn: Any, config: Config) -> int:
        result = await destroy_kek(conn, _providers(config), args.version)
        kek = result.kek
        if result.already_destroyed:
            print(f"KEK version {kek.version} ({kek.kek_id}) was already destroyed")
        else:
            print(f"KEK version {kek.version} ({kek.kek_id}) destroyed")
        if not result.material_destroyed and not result.already_destroyed:
            print(
                f"warning: no configured key provider held the material of {kek.kek_id}; destroy it where it "
                "lives (key file, HSM object)",
                file=sys.stderr,
            )
        return 0

    return _run(args, work)


def _kek_row(k: KekInfo) -> dict[str, Any]:
    return {
        "version": k.version,
        "kek_id": k.kek_id,
        "provider": k.provider_id,
        "state": k.state,
        "primary": k.is_primary,
        "wrapped_keys": k.wrapped_keys,
        "created_at": k.created_at.isoformat(),
        "destroyed_at": k.destroyed_at.isoformat() if k.destroyed_at else None,
    }


def cmd_list_keks(args: argparse.Namespace) -> int:
    async def work(conn: Any, config: Config) -> int:
        keks = await list_keks(conn)
        if args.json:
            print(json.dumps([_kek_row(k) for k in keks], indent=2))
            return 0
        print(f"{'version':>7}  {'state':<9}  {'primary':<7}  {'keys':>8}  kek_id")
        for k in keks:
            print(f"{k.version:>7}  {k.state:<9}  {'yes' if k.is_primary else '':<7}  {k.wrapped_keys:>8}  {k.kek_id}")
        return 0

    return _run(args, work)


def _subparsers(parser: argparse.ArgumentParser) -> Any:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def add_kek_commands(sub: Any) -> None:
    """Adds ``keys rotate-kek``, ``keys destroy-kek`` and ``keys list-keks`` to the ``pgveil`` parser's
    subcommands (joining a ``keys`` group that another module may have created)."""
    from proxy.cli import _config_arg

    keys = sub.choices.get("keys")
    if keys is None:
        keys = sub.add_parser("keys", help="manage data keys and key-encryption keys")
    ksub = _subparsers(keys) or keys.add_subparsers(dest="keys_command", required=True)

    r = ksub.add_parser("rotate-kek", help="re-wrap every data key under a new KEK version (online, resumable)")
    _config_arg(r)
    r.add_argument(
        "--to-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="move the keys to the KEK of this configuration's keystore.master_key (e.g. local -> pkcs11)",
    )
    r.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="keys per transaction")
    r.add_argument("--pause", type=float, default=0.0, metavar="SECONDS", help="sleep between batches (throttle)")
    r.set_defaults(func=cmd_rotate_kek)

    d = ksub.add_parser("destroy-kek", help="destroy an old KEK version once no key is wrapped under it")
    _config_arg(d)
    d.add_argument("version", type=int, help="the KEK version (pgveil keys list-keks)")
    d.set_defaults(func=cmd_destroy_kek)

    ls = ksub.add_parser("list-keks", help="every KEK version, its state, and how many keys it wraps")
    _config_arg(ls)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list_keks)
