"""``pgveil policy explain`` and ``pgveil catalog snapshot``: what a role would get for a statement,
before a policy goes live.

``policy explain --config FILE --role ROLE "SQL"`` runs the proxy's own analysis of the statement and
the per-statement decision for the role, with the policy of FILE, and prints for every result column
what it comes back as (plaintext, which mask, NULL, ciphertext) and why (the policy role and pattern
that granted it, or ``default``), or why the statement is refused and with which SQLSTATE. Nothing is
sent to the server but catalog reads: the statement itself never leaves this process (its literals
may be secrets).

The catalog and the role membership come from the service connection (online) or from a snapshot
written by ``catalog snapshot`` (``--catalog FILE``, offline). A snapshot holds the answers to the
catalog queries pgveil makes (the same queries the proxy makes, replayed offline against the
configuration's tables) and the membership graph; never table contents.

Exit codes: 0 the statement is allowed, 1 it is refused, 2 usage, configuration, snapshot or
connection problems (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.catalog_loader import load_catalog
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.policy.decide import PolicyDenied, decide
from proxy.policy.masks import mask_entry
from proxy.policy.membership import MembershipGraph
from proxy.policy.model import Grant, RoleView, Visibility
from proxy.policy.rules import Policy
from proxy.policy_runtime import member_of
from proxy.rewrite.catalog import Catalog, ProtectedColumn
from proxy.rewrite.plan import CopyDirection, CopyFormat, StatementPlan

SNAPSHOT_FORMAT = "pgveil-catalog-snapshot"
SNAPSHOT_VERSION = 1


class CliProblem(Exception):
    """Something that stops the command; its text is the one line printed (exit code 2)."""


# -- the catalog, recorded and replayed ---------------------------------------------------------------


def _key(query: str, args: tuple[Any, ...]) -> str:
    return json.dumps([query, list(args)], sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    raise CliProblem(f"pgveil: the catalog returned a value of type {type(value).__name__} a snapshot cannot hold")


class RecordingConnection:
    """Passes catalog queries to a real connection and keeps their answers."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.reads: list[dict[str, Any]] = []

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows = list(await self._conn.fetch(query, *args))
        self.reads.append(
            {
                "query": query,
                "args": [_plain(a) for a in args],
                "rows": [{k: _plain(v) for k, v in dict(r).items()} for r in rows],
            }
        )
        return rows


class ReplayConnection:
    """Answers catalog queries from a snapshot; a query the snapshot did not record is a CliProblem
    (the configuration names tables the snapshot was not taken for, or another pgveil version wrote it)."""

    def __init__(self, reads: list[dict[str, Any]]) -> None:
        self._answers: dict[str, list[dict[str, Any]]] = {}
        for r in reads:
            self._answers.setdefault(_key(r["query"], tuple(r["args"])), r["rows"])

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows = self._answers.get(_key(query, tuple(_plain(a) for a in args)))
        if rows is None:
            raise CliProblem(
                "pgveil: the catalog snapshot does not cover this configuration's tables; "
                "write a new one with pgveil catalog snapshot"
            )
        return rows


@dataclass(frozen=True, slots=True)
class Snapshot:
    catalog: Catalog
    membership: MembershipGraph
    problems: tuple[str, ...]


async def take_snapshot(config: Config, connect: Callable[[], Any]) -> tuple[Snapshot, dict[str, Any]]:
    """The snapshot and its file contents."""
    from proxy.policy_runtime import read_membership

    conn = await connect()
    try:
        rec = RecordingConnection(conn)
        catalog, problems = await load_catalog(rec, config.catalog())
        graph = await read_membership(conn)
    finally:
        await conn.close()
    data = {
        "format": SNAPSHOT_FORMAT,
        "version": SNAPSHOT_VERSION,
        "written_by": f"pgveil {__version__}",
        "catalog_reads": rec.reads,
        "membership": graph.to_json(),
    }
    return Snapshot(catalog, graph, tuple(problems)), data


def read_snapshot_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CliProblem(f"pgveil: cannot read the catalog snapshot {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise CliProblem(f"pgveil: {path} is not a catalog snapshot (not JSON)") from None


async def replay_snapshot(config: Config, data: Any, path: Path) -> Snapshot:
    """The catalog (joined with ``config``'s tables) and membership of a snapshot file's contents."""
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise CliProblem(f"pgveil: {path} is not a catalog snapshot")
    if data.get("version") != SNAPSHOT_VERSION:
        raise CliProblem(f"pgveil: {path} is a catalog snapshot of another format version; write a new one")
    reads = data.get("catalog_reads")
    if not isinstance(reads, list) or not all(
        isinstance(r, dict) and isinstance(r.get("query"), str) and isinstance(r.get("args"), list)
        and isinstance(r.get("rows"), list)
        for r in reads
    ):  # fmt: skip
        raise CliProblem(f"pgveil: {path}: catalog_reads is malformed")
    try:
        graph = MembershipGraph.from_json(data.get("membership"))
    except ValueError as e:
        raise CliProblem(f"pgveil: {path}: {e}") from None
    try:
        catalog, problems = await load_catalog(ReplayConnection(reads), config.catalog())
    except (KeyError, TypeError):
        raise CliProblem(f"pgveil: {path}: catalog_reads is malformed") from None
    return Snapshot(catalog, graph, tuple(problems))


async def online_snapshot(config: Config, connect: Callable[[], Any]) -> Snapshot:
    from proxy.policy_runtime import read_membership

    conn = await connect()
    try:
        catalog, problems = await load_catalog(conn, config.catalog())
        graph = await read_membership(conn)
    finally:
        await conn.close()
    return Snapshot(catalog, graph, tuple(problems))


def _service_connect(config: Config) -> Callable[[], Any]:

    service = config.service
    if service is None or service.dsn is None:
        raise CliProblem("pgveil: service.dsn (or keystore.dsn / PGVEIL_KEYSTORE_DSN) is not set")
    dsn, password_file = service.dsn, service.password_file

    async def connect() -> Any:
        from proxy.cli_errors import connect

        return await connect("the service connection", dsn, password_file, timeout=10)

    return connect


# -- commands ------------------------------------------------------------------------------------------


def cmd_catalog_snapshot(args: argparse.Namespace, config: Config) -> int:
    try:
        snap, data = asyncio.run(take_snapshot(config, _service_connect(config)))
        args.out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    except CliProblem as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pgveil: cannot write {args.out}: {e.strerror}", file=sys.stderr)
        return 2
    for p in snap.problems:
        print(f"warning: {p}", file=sys.stderr)
    print(
        f"catalog snapshot written to {args.out}: {len(snap.catalog.tables)} governed relations, "
        f"{len(snap.membership.roles)} roles"
    )
    return 0


def add_parsers(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None], run: Callable[..., int]) -> None:
    """Registers ``policy explain`` and ``catalog snapshot`` on the ``pgveil`` parser."""
    pol = sub.add_parser("policy", help="inspect the visibility policy")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    ex = psub.add_parser(
        "explain", help="what a role gets for a statement: per result column, or why it is refused (SQLSTATE)"
    )
    config_arg(ex)
    ex.add_argument("--role", required=True, help="the login role (as a client would authenticate)")
    ex.add_argument("--catalog", type=Path, default=None, help="a catalog snapshot to work offline from")
    ex.add_argument("--json", action="store_true", help="print JSON instead of text")
    ex.add_argument("sql", help="the statement")
    ex.set_defaults(func=lambda a: run(a, cmd_policy_explain))

    cat = sub.add_parser("catalog", help="the server catalog as pgveil reads it")
    csub = cat.add_subparsers(dest="catalog_command", required=True)
    sn = csub.add_parser("snapshot", help="write the catalog and role membership to a file for offline explain")
    config_arg(sn)
    sn.add_argument("--out", type=Path, required=True, help="the snapshot file to write (JSON)")
    sn.set_defaults(func=lambda a: run(a, cmd_catalog_snapshot))


# -- the explanation ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnAnswer:
    """What one result column comes back as, and why."""

    position: int  # 1-based
    column: str | None  # the governed column's id, or None for a column no policy governs
    outcome: str  # "plaintext", "masked", "NULL", "ciphertext", "as stored" (not governed)
    detail: str  # e.g. the mask and what it gives for the declared type
    source: str  # the policy role and pattern, "default", or "" (not governed)


@dataclass(frozen=True, slots=True)
class StatementAnswer:
    allowed: bool
    sqlstate: str | None = None
    message: str | None = None
    hint: str | None = None
    columns: tuple[ColumnAnswer, ...] | None = None  # None: no rows, or a width known only at run time
    uses: tuple[str, ...] = ()  # the uses of governed columns the decision looked at
    governed: bool = True


@dataclass(frozen=True, slots=True)
class Explanation:
    role: str
    policy_roles: tuple[str, ...]  # the policy roles that contribute to the login role's view
    statements: tuple[StatementAnswer, ...]

    @property
    def allowed(self) -> bool:
        return all(s.allowed for s in self.statements)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "policy_roles": list(self.policy_roles),
            "allowed": self.allowed,
            "statements": [
                {
                    "allowed": s.allowed,
                    "sqlstate": s.sqlstate,
                    "message": s.message,
                    "hint": s.hint,
                    "governed": s.governed,
                    "uses": list(s.uses),
                    "columns": None
                    if s.columns is None
                    else [
                        {
                            "position": c.position,
                            "column": c.column,
                            "outcome": c.outcome,
                            "detail": c.detail,
                            "source": c.source,
                        }
                        for c in s.columns
                    ],
                }
                for s in self.statements
            ],
        }

    def render(self) -> str:
        lines = [f"role {self.role}: " + (
            "policy roles " + ", ".join(self.policy_roles) + " (default for the columns they do not name)"
            if self.policy_roles else "named by no policy role: the default applies to every governed column"
        )]  # fmt: skip
        many = len(self.statements) > 1
        for i, s in enumerate(self.statements, 1):
            head = f"statement {i}: " if many else ""
            if not s.governed:
                lines.append(f"{head}allowed: it uses no governed column and passes through unchanged")
                continue
            if not s.allowed:
                lines.append(f"{head}refused with SQLSTATE {s.sqlstate}: {s.message}")
                if s.hint:
                    lines.append(f"  hint: {s.hint}")
                continue
            lines.append(f"{head}allowed")
            if s.uses:
                lines.append("  uses of governed columns: " + "; ".join(s.uses))
            if s.columns is None:
                lines.append(
                    "  result columns: known only when it runs (governed ones are treated as below per column)"
                )
                continue
            if not s.columns:
                lines.append("  no result rows")
                continue
            width = max(len(c.column or "-") for c in s.columns)
            for c in s.columns:
                why = f"  ({c.source})" if c.source else ""
                what = f"{c.outcome}: {c.detail}" if c.detail else c.outcome
                lines.append(f"  {c.position:>3}  {(c.column or '-').ljust(width)}  {what}{why}")
        return "\n".join(lines)


def _describe(column: ProtectedColumn, grant: Grant) -> tuple[str, str]:
    """(outcome, detail) of a result column carrying ``column`` for a role with ``grant``."""
    v = grant.visibility
    if v is Visibility.PLAINTEXT:
        return "plaintext", "decrypted" if column.encrypted else "as stored"
    if v in (Visibility.MASKED, Visibility.MATCH):
        assert grant.mask is not None
        try:
            cell = mask_entry(grant.mask, column.declared_type).result.replace("`", "")  # markdown in the table
        except ProxyError:
            cell = ""
        what = f"{grant.mask} on {column.declared_type}" + (f" ({cell})" if cell else "")
        return "masked", what + ("; match: masked until the column is searchable" if v is Visibility.MATCH else "")
    if v is Visibility.HIDDEN:
        return "NULL", "hidden" + (", never decrypted" if column.encrypted else "")
    if v is Visibility.CIPHERTEXT:
        return (
            ("ciphertext", "the stored envelope, as bytea") if column.encrypted else ("as stored", "ciphertext grant")
        )
    return "refused", "deny"  # never reached: the decision refuses a statement that references a denied column


def explain(catalog: Catalog, policy: Policy, graph: MembershipGraph, role: str, sql: str) -> Explanation:
    """Runs the proxy's analysis of ``sql`` and the decision for ``role`` (pure: no I/O)."""
    from proxy.encrypt.engine import CryptoContext
    from proxy.encrypt.keyring import KeyRing

    ctx = CryptoContext(catalog, KeyRing(None))
    view = policy.view(role, member_of(graph, role), 1)
    contributing = tuple(sorted(r for r in graph.inherited_roles(role) if r in policy.role_names))
    plan = ctx.analyze(sql)
    answers: list[StatementAnswer] = []
    if plan.unparseable:
        if plan.touches_protected:
            e = plan.refusal
            answers.append(_refused(e) if e is not None else StatementAnswer(False, "42601", "pgveil: cannot parse it"))
        else:
            answers.append(StatementAnswer(True, governed=False))
        return Explanation(role, contributing, tuple(answers))
    if not plan.statements or not plan.touches_protected:
        return Explanation(role, contributing, (StatementAnswer(True, governed=False),))
    for st in plan.statements:
        if not st.touches_protected:
            answers.append(StatementAnswer(True, governed=False))
            continue
        refused = st.refusal or decide(st.references, view) or _binary_copy_refusal(st, view)
        uses = tuple(f"{r.column.column_id} ({r.kind.value}, {r.construct})" for r in st.references)
        if refused is not None:
            answers.append(_refused(refused, uses))
            continue
        columns: tuple[ColumnAnswer, ...] | None = None
        if st.result_columns is not None:
            out = []
            for i, col in enumerate(st.result_columns, 1):
                if col is None:
                    out.append(ColumnAnswer(i, None, "as stored", "not governed", ""))
                    continue
                grant = view.grant(col)
                outcome, detail = _describe(col, grant)
                out.append(ColumnAnswer(i, col.column_id, outcome, detail, grant.source))
            columns = tuple(out)
        answers.append(StatementAnswer(True, columns=columns, uses=uses))
    return Explanation(role, contributing, tuple(answers))


def _binary_copy_refusal(st: StatementPlan, view: RoleView) -> ProxyError | None:
    """As the session refuses it: a binary COPY TO of a governed column the role does not see in plaintext
    (its rows cannot be masked or withheld field by field)."""
    cp = st.copy
    if cp is None or cp.direction is not CopyDirection.TO or cp.format is not CopyFormat.BINARY:
        return None
    for col in cp.governed_columns:
        if col is not None and view.grant(col).visibility is not Visibility.PLAINTEXT:
            return PolicyDenied(
                f"pgveil: permission denied for column {col.column_id}: binary COPY TO needs plaintext access "
                f"(role {view.login_role} does not have it)",
                hint="use COPY in text or CSV format",
            )
    return None


def _refused(e: ProxyError, uses: tuple[str, ...] = ()) -> StatementAnswer:
    return StatementAnswer(False, e.sqlstate, e.message, e.hint, uses=uses)


def cmd_policy_explain(args: argparse.Namespace, config: Config) -> int:
    try:
        if args.catalog is not None:
            data = read_snapshot_file(args.catalog)
            snap = asyncio.run(replay_snapshot(config, data, args.catalog))
        else:
            snap = asyncio.run(online_snapshot(config, _service_connect(config)))
        if snap.problems:
            raise CliProblem("pgveil: the catalog does not match the configuration: " + "; ".join(snap.problems))
        if not snap.membership.knows(args.role):
            # The proxy refuses its governed statements (55000) until it exists; explain it as a role
            # that is a member of nothing, which is what it will be when created without IN ROLE.
            print(
                f"warning: role {args.role!r} does not exist (yet); explained as a member of no role", file=sys.stderr
            )
        result = explain(snap.catalog, config.policy, snap.membership, args.role, args.sql)
    except CliProblem as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=1) if args.json else result.render())
    return 0 if result.allowed else 1
