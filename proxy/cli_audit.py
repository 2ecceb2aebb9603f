"""``pgveil audit report --since 1h``: the access audit summarised per policy role and column.

Reads ``pgveil.access_audit`` in the keystore (``--config FILE`` names it) and prints, per (policy role,
column), the values read as plaintext, masked, hidden and ciphertext, the sessions and login roles they
came from, and the time they span (``--instance NAME``: one pgveil's records only); ``--json`` prints the
same as one JSON document. Read-only: it applies no migration. Exit codes as for every ``pgveil``
command: 0 done, 1 the keystore is unreachable or has no audit table (one line saying which), 2 invalid
configuration or usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable
from typing import Any

REPORT_SQL = """
SELECT policy_role, column_id, outcome, sum(values_read)::bigint AS n,
       count(DISTINCT (instance, session_id)) AS sessions,
       array_agg(DISTINCT login_role ORDER BY login_role) AS login_roles,
       min(period_start) AS first_start, max(period_end) AS last_end
FROM pgveil.access_audit
WHERE period_end >= now() - $1::interval AND ($2::text IS NULL OR instance = $2)
GROUP BY policy_role, column_id, outcome
ORDER BY policy_role, column_id, outcome
"""
OUTCOMES = ("plaintext", "masked", "hidden", "ciphertext")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d{1,9})([smhd])\Z")


def parse_since(text: str) -> datetime.timedelta:
    """``30s``, ``30m``, ``1h``, ``7d``: how far back the report reaches."""
    m = _DURATION.match(text.strip().lower())
    if m is None or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"must be a duration like 30m, 1h or 7d, got {text!r}")
    return datetime.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def summarise(rows: list[Any]) -> list[dict[str, Any]]:
    """One entry per (policy role, column): counts per outcome, sessions, login roles, the time spanned."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["policy_role"], r["column_id"])
        entry = out.setdefault(
            key,
            {
                "role": key[0],
                "column": key[1],
                **dict.fromkeys(OUTCOMES, 0),
                "sessions": 0,
                "login_roles": set(),
                "first": None,
                "last": None,
            },
        )
        if r["outcome"] in OUTCOMES:
            entry[r["outcome"]] += int(r["n"])
        entry["sessions"] = max(entry["sessions"], int(r["sessions"]))  # a lower bound across outcomes
        entry["login_roles"].update(r["login_roles"])
        first, last = r["first_start"], r["last_end"]
        entry["first"] = first if entry["first"] is None else min(entry["first"], first)
        entry["last"] = last if entry["last"] is None else max(entry["last"], last)
    result = []
    for entry in out.values():
        entry["login_roles"] = sorted(entry["login_roles"])
        entry["first"] = entry["first"].isoformat() if entry["first"] is not None else None
        entry["last"] = entry["last"].isoformat() if entry["last"] is not None else None
        result.append(entry)
    return result


def render_table(entries: list[dict[str, Any]], since: str) -> str:
    if not entries:
        return f"no values of governed columns read in the last {since}"
    head = ("role", "column", *OUTCOMES, "sessions", "login roles")
    lines = [
        tuple(
            [
                e["role"],
                e["column"],
                *(str(e[o]) for o in OUTCOMES),
                str(e["sessions"]),
                ",".join(e["login_roles"]),
            ]
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in (head, *lines)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [f"values read in the last {since}, per policy role and column:", fmt.format(*head)]
        + [fmt.format(*row) for row in lines]
    )


def cmd_report(args: argparse.Namespace) -> int:
    import asyncpg

    from proxy.cli import _load, run_async
    from proxy.encrypt.runtime import connect_kwargs

    config = _load(args)
    ks = config.keystore
    if ks is None or ks.dsn is None:
        print("pgveil: keystore.dsn (or PGVEIL_KEYSTORE_DSN) is not set: no audit table to read", file=sys.stderr)
        return 2
    dsn, password_file = ks.dsn, ks.password_file

    async def main() -> int:
        try:
            conn = await asyncpg.connect(**connect_kwargs(dsn, password_file), timeout=30)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            print(f"pgveil: cannot connect to the keystore ({type(exc).__name__})", file=sys.stderr)
            return 1
        try:
            rows = await conn.fetch(REPORT_SQL, args.since, args.instance)
        except asyncpg.UndefinedTableError:
            print(
                "pgveil: the keystore has no access audit table (pgveil.access_audit): run pgveil keystore init",
                file=sys.stderr,
            )
            return 1
        except asyncpg.InsufficientPrivilegeError:
            print("pgveil: the keystore role may not read pgveil.access_audit (GRANT SELECT on it)", file=sys.stderr)
            return 1
        finally:
            await conn.close()
        entries = summarise(rows)
        if args.json:
            print(json.dumps({"since": args.since_text, "instance": args.instance, "entries": entries}, indent=2))
        else:
            print(render_table(entries, args.since_text))
        return 0

    return run_async(main)


def add_parsers(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    a = sub.add_parser("audit", help="the access audit: who read which governed columns, and as what")
    asub = a.add_subparsers(dest="audit_command", required=True)
    r = asub.add_parser("report", help="values read per policy role and column, from the keystore's audit table")
    config_arg(r)
    r.add_argument(
        "--since", default="1h", metavar="DURATION", help="how far back: 30m, 1h, 7d (default 1h)", dest="since_text"
    )
    r.add_argument("--instance", default=None, help="only the records of this pgveil instance (audit.instance)")
    r.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    r.set_defaults(func=_report_with_since)


def _report_with_since(args: argparse.Namespace) -> int:
    try:
        args.since = parse_since(args.since_text)
    except argparse.ArgumentTypeError as e:
        print(f"pgveil: --since {e}", file=sys.stderr)
        return 2
    return cmd_report(args)
