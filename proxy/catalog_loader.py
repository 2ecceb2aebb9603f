"""Reads the server catalog for the protected tables and joins it with the configured catalog.

``read_tables`` and ``read_family`` are the only I/O here (a few catalog queries over the service
connection, whatever the number of tables); ``resolve_catalog`` and ``resolve_family`` are the pure
joins that fill in table OIDs, attribute numbers and column order, add each protected table's family
(partitions and inheritance children at any depth, from pg_inherits; views over any of them, from
pg_depend and pg_rewrite, their columns mapped by analysing the view's definition; the parents any of
them inherits from or is a partition of, and the relations with a rule that depends on any of them,
which are opaque: a write into one reaches the protected relation) and the relations
that share a protected relation's name, and name every mismatch between configuration and database.
``proxy.schema`` reuses them. This module never changes the database and never reads table contents.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pglast import parser as pg_parser

from proxy.encrypt.subjectgen import ColumnDefault
from proxy.policy.model import ReferenceKind
from proxy.rewrite.catalog import Catalog, ProtectedColumn, ProtectedTable, SubjectColumn

log = logging.getLogger(__name__)

BYTEA_OID = 17  # fixed in pg_type.dat, the same on every server
TABLE_RELKINDS = frozenset({"r", "p"})  # ordinary and partitioned tables
_RELKIND_NAMES = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "i": "an index",
    "I": "a partitioned index",
    "S": "a sequence",
    "c": "a composite type",
    "t": "a TOAST table",
}


class CatalogConnection(Protocol):
    """The part of ``asyncpg.Connection`` this module uses."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    attnum: int
    type_name: str  # format_type() output, e.g. "character varying(20)"
    is_bytea: bool
    has_default: bool
    generated: bool
    identity: bool


@dataclass(frozen=True, slots=True)
class ConstraintInfo:
    name: str
    kind: str  # pg_constraint.contype: 'c' check, 'p' primary key, ...
    validated: bool


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the server says about one relation; ``columns`` in attribute order, dropped ones left out."""

    schema: str
    name: str
    oid: int
    relkind: str
    columns: tuple[ColumnInfo, ...]
    constraints: tuple[ConstraintInfo, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    def constraint(self, name: str) -> ConstraintInfo | None:
        return next((c for c in self.constraints if c.name == name), None)

    @property
    def kind_name(self) -> str:
        return "a table" if self.relkind in TABLE_RELKINDS else _RELKIND_NAMES.get(self.relkind, "not a table")


_TABLES_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.oid AS oid, c.relkind::text AS relkind
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN unnest($1::text[], $2::text[]) AS wanted(schema, name)
  ON n.nspname = wanted.schema AND c.relname = wanted.name
"""

_COLUMNS_SQL = """
SELECT a.attrelid AS relid, a.attnum AS attnum, a.attname AS name,
       pg_catalog.format_type(a.atttypid, a.atttypmod) AS type_name,
       a.atttypid = $2::oid AS is_bytea, a.atthasdef AS has_default,
       a.attgenerated <> '' AS generated, a.attidentity <> '' AS identity
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

_CONSTRAINTS_SQL = """
SELECT conrelid AS relid, conname AS name, contype::text AS kind, convalidated AS validated
FROM pg_catalog.pg_constraint
WHERE conrelid = ANY($1::oid[])
"""


_TABLES_BY_OID_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.oid AS oid, c.relkind::text AS relkind
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY($1::oid[])
"""


async def read_tables(
    conn: CatalogConnection, names: Iterable[tuple[str, str]], follow: dict[tuple[str, str], int] | None = None
) -> dict[tuple[str, str], TableInfo]:
    """The relations among ``names`` (``(schema, table)``) that exist, keyed like ``names``. ``follow``
    gives the OID a name had when last read: a name that no longer exists is looked up by it (the table
    was renamed or moved) and keyed by the old name."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return {}
    rels = list(await conn.fetch(_TABLES_SQL, [s for s, _ in wanted], [t for _, t in wanted]))
    found_names = {(r["schema"], r["name"]) for r in rels}
    lost = {oid: key for key, oid in (follow or {}).items() if key not in found_names and key in wanted}
    alias: dict[int, tuple[str, str]] = {}
    if lost:
        for r in await conn.fetch(_TABLES_BY_OID_SQL, list(lost)):
            rels.append(r)
            alias[r["oid"]] = lost[r["oid"]]
    oids = [r["oid"] for r in rels]
    columns = await _columns_of(conn, oids)
    constraints: dict[int, list[ConstraintInfo]] = {oid: [] for oid in oids}
    if oids:
        for r in await conn.fetch(_CONSTRAINTS_SQL, oids):
            constraints[r["relid"]].append(ConstraintInfo(r["name"], r["kind"], r["validated"]))
    return {
        alias.get(r["oid"], (r["schema"], r["name"])): TableInfo(
            schema=r["schema"],
            name=r["name"],
            oid=r["oid"],
            relkind=r["relkind"],
            columns=tuple(columns[r["oid"]]),
            constraints=tuple(constraints[r["oid"]]),
        )
        for r in rels
    }


def resolve_catalog(
    configured: Catalog,
    found: dict[tuple[str, str], TableInfo],
    previous: Catalog | None = None,
    migrating: Mapping[str, str] | None = None,
) -> tuple[Catalog, list[str]]:
    """``configured`` with what the server knows filled in, and one line per mismatch.

    Every configured table and column stays in the result, even when the server lacks it: the
    rewriter must keep treating the name as protected (fail closed) rather than forget it. A table or
    column renamed since ``previous`` was read is followed by OID and attribute number: it is known by
    its new name and keeps its configured identity (``column_id``), so what was written before still
    decrypts; the log says to update the configuration.

    ``migrating`` maps the column ids with an unfinished ``pgveil encrypt`` / ``pgveil decrypt`` job (read
    from the keystore) to its direction: such a column is served as the database stores it until the
    job's swap (see :func:`_as_stored`).
    """
    problems: list[str] = []
    tables: dict[tuple[str, str], ProtectedTable] = {}
    earlier = {
        t.configured_as or k: t for k, t in (previous.tables.items() if previous is not None else ()) if t.root is None
    }
    for key, table in configured.tables.items():
        info = found.get(key)
        if info is None:
            problems.append(f"table {table.qualified_name} does not exist; create it, then run `pgveil schema apply`")
            tables[key] = table
            continue
        if info.relkind not in TABLE_RELKINDS:
            problems.append(f"{table.qualified_name} is {info.kind_name}; only tables can hold protected columns")
            tables[key] = table
            continue
        columns = {}
        before = earlier.get(key)
        if before is not None and before.oid != info.oid:
            before = None
        if (info.schema, info.name) != key:
            log.warning("table %s is now %s; update the configuration", table.qualified_name, info.qualified_name)
        for name, column in table.columns.items():
            col = info.column(name)
            old = (
                next((c for c in before.columns.values() if c.column_id == column.column_id), None)
                if before is not None
                else None
            )
            if col is None and old is not None and old.attnum:
                col = next((c for c in info.columns if c.attnum == old.attnum), None)
                if col is not None:
                    log.warning("column %s is now named %s; update the configuration", column.column_id, col.name)
            if col is None:
                problems.append(f"column {column.column_id} does not exist; run `pgveil schema apply`")
                columns[name] = column
                continue
            if migrating and column.column_id in migrating:
                column = _as_stored(column, col, info, migrating[column.column_id])
                shadow = _shadow_of(column, info, migrating[column.column_id])
                if shadow is not None:
                    columns[shadow.name] = shadow
            problem = _column_problem(column, col, info)
            if problem is not None:
                problems.append(problem)
            columns[col.name] = dataclasses.replace(
                column,
                schema=info.schema,
                table=info.name,
                name=col.name,
                attnum=col.attnum,
                table_oid=info.oid,
                identity="" if (info.schema, info.name, col.name) == (*key, name) else column.column_id,
            )
        subject = table.subject
        if subject is not None:
            subject, problem = _subject_column(table, subject, info)
            if problem is not None:
                problems.append(problem)
        tables[(info.schema, info.name)] = dataclasses.replace(
            table,
            schema=info.schema,
            name=info.name,
            configured_as=None if (info.schema, info.name) == key else key,
            columns=columns,
            all_columns=tuple(c.name for c in info.columns),
            oid=info.oid,
            attnums=tuple(c.attnum for c in info.columns),
            subject=subject,
        )
    problems.extend(_subject_kind_problems(tables.values()))
    return Catalog(tables), problems


# format_type() names of the types a subject column may have, by class (see SUBJECT_TYPES).
_SUBJECT_TYPE_CLASSES = {
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "uuid": "uuid",
    "text": "text",
}


def _subject_column(table: ProtectedTable, subject: SubjectColumn, info: TableInfo) -> tuple[SubjectColumn, str | None]:
    """The subject column with its type class read from the database, or the problem with it."""
    where = f"tables.{table.qualified_name}.subject.column"
    col = info.column(subject.column)
    if col is None:
        return subject, f"{where}: column {subject.column} of {table.qualified_name} does not exist"
    type_class = _SUBJECT_TYPE_CLASSES.get(col.type_name)
    if type_class is None and col.type_name.startswith("character varying"):
        type_class = "text"
    if type_class is None:
        return subject, (
            f"{where}: column {subject.column} of {table.qualified_name} is {col.type_name}; a subject column must "
            "be integer, bigint, smallint, uuid, text or varchar"
        )
    return dataclasses.replace(subject, type_class=type_class), None


def _subject_kind_problems(tables: Iterable[ProtectedTable]) -> list[str]:
    """Every table of one subject kind must name its subjects with the same type class, so that one
    subject has one canonical id (and one key) whichever table a row is in."""
    seen: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    for table in tables:
        s = table.subject
        if s is None or not s.type_class or table.root is not None:
            continue
        first = seen.setdefault(s.kind, (s.type_class, table.qualified_name))
        if first[0] != s.type_class:
            problems.append(
                f"tables.{table.qualified_name}.subject: subject kind {s.kind} is {first[0]} in {first[1]} but "
                f"{s.type_class} here; every table of one kind must use the same type of subject id"
            )
    return problems


def _as_stored(column: ProtectedColumn, col: ColumnInfo, info: TableInfo, direction: str) -> ProtectedColumn:
    """A column the configuration already names in its target state while a migration job moves it there:
    served as it is still stored. ``encrypt`` (configured ``encrypt: true``): a column that is not bytea yet
    holds plaintext, so it is served and written as a plain governed column; ``decrypt`` (configured plain):
    a bytea column with the envelope CHECK still holds envelopes, so it is served encrypted. Once the swap
    has committed, the database column is in the target state and the configuration applies as it is;
    the reload between the two is what the swap's notification (and a RowDescription naming the new
    column's attribute number, which no catalog read before the swap knows) brings about."""
    from proxy.schema import constraint_name  # proxy.schema imports this module

    check = info.constraint(constraint_name(col.name))
    enveloped = col.is_bytea and check is not None and check.kind == "c"
    if direction == "encrypt" and column.encrypted and not enveloped:
        log.info("column %s is being encrypted: served as a plain governed column until the swap", column.column_id)
        return dataclasses.replace(column, encrypted=False)
    if direction == "decrypt" and not column.encrypted and enveloped:
        log.info("column %s is being decrypted: served encrypted until the swap", column.column_id)
        return dataclasses.replace(column, encrypted=True)
    return column


def _shadow_of(column: ProtectedColumn, info: TableInfo, direction: str) -> ProtectedColumn | None:
    """The migration job's shadow column, governed as the column itself (its identity, so its grants and
    keys): encrypted while encrypting, plain while decrypting. The swap renames it to the column's name,
    so a result that names its attribute number right after the swap, before this instance has read its
    catalog again, is still served as the column's values (decrypted, masked, hidden...), never as the
    stored envelope; and ``SELECT *`` during the migration shows it under the policy of the column."""
    from keymgmt.column_migration import short_name

    shadow = info.column(short_name("pgveil_mig_", column.name))
    if shadow is None:
        return None
    return dataclasses.replace(
        column,
        schema=info.schema,
        table=info.name,
        name=shadow.name,
        attnum=shadow.attnum,
        table_oid=info.oid,
        identity=column.column_id,
        encrypted=direction == "encrypt",
    )


def _column_problem(column: ProtectedColumn, col: ColumnInfo, info: TableInfo) -> str | None:
    """Why the database column does not fit the configured one: an encrypted column must be bytea; a
    plain one must not be what ``pgveil schema apply`` made of an encrypted one (bytea with the envelope
    CHECK constraint), since a config written for the old default (``encrypt`` omitted meant encrypted)
    would otherwise serve envelopes as the column's plain values and never seal what it writes."""
    if column.encrypted:
        if not col.is_bytea:
            return f"column {column.column_id} is {col.type_name}, expected bytea; run `pgveil schema apply`"
        return None
    from proxy.schema import constraint_name  # proxy.schema imports this module

    check = info.constraint(constraint_name(col.name))
    if col.is_bytea and check is not None and check.kind == "c":
        return (
            f"column {column.column_id} is configured plain but encrypted in the database (bytea with pgveil's "
            f"envelope constraint {check.name}): set encrypt: true"
        )
    return None


_DESCENDANTS_SQL = """
WITH RECURSIVE family(root, relid, depth) AS (
    SELECT r, r, 0 FROM unnest($1::oid[]) AS r
  UNION
    SELECT f.root, i.inhrelid, f.depth + 1
    FROM family f JOIN pg_catalog.pg_inherits i ON i.inhparent = f.relid
    WHERE f.depth < 64
)
SELECT f.root AS root, c.oid AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind
FROM family f
JOIN pg_catalog.pg_class c ON c.oid = f.relid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE f.relid <> f.root
"""

# The ancestors of the relations (parents they inherit from or are partitions of, at any depth), with the
# relation each was reached from: a write into an ancestor reaches its protected descendant (INSERT routed
# into a partition, UPDATE and DELETE recursing into inheritance children).
_ANCESTORS_SQL = """
WITH RECURSIVE up(origin, relid, depth) AS (
    SELECT i.inhrelid, i.inhparent, 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = ANY($1::oid[])
  UNION
    SELECT u.origin, i.inhparent, u.depth + 1
    FROM up u JOIN pg_catalog.pg_inherits i ON i.inhrelid = u.relid
    WHERE u.depth < 64
)
SELECT DISTINCT ON (c.oid) u.origin AS origin, c.oid AS oid, n.nspname AS schema, c.relname AS name,
       c.relkind::text AS relkind
FROM up u
JOIN pg_catalog.pg_class c ON c.oid = u.relid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
ORDER BY c.oid, u.depth, u.origin
"""

# Relations with a rule other than a view's SELECT rule (ON INSERT/UPDATE/DELETE, DO INSTEAD or ALSO) that
# depends on one of the relations: a write into them may be rewritten into a write of the protected one.
_RULE_WRITERS_SQL = """
SELECT DISTINCT ON (c.oid) d.refobjid AS origin, c.oid AS oid, n.nspname AS schema, c.relname AS name,
       c.relkind::text AS relkind
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
  AND d.refobjid = ANY($1::oid[]) AND r.ev_class <> d.refobjid AND r.ev_type <> '1'
ORDER BY c.oid, d.refobjid
"""

# Views (and materialized views) whose rewrite rule depends on one of the relations.
_VIEWS_SQL = """
SELECT DISTINCT c.oid AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind,
       pg_catalog.pg_get_viewdef(c.oid) AS definition
FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid
JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
  AND d.refobjid = ANY($1::oid[]) AND r.ev_class <> d.refobjid AND c.relkind IN ('v', 'm')
"""

# Every relation a FROM clause or a write could name, by name.
_NAMESAKES_SQL = """
SELECT n.nspname AS schema, c.relname AS name
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""

_MAX_VIEW_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Member:
    """A relation in a protected table's family: ``root`` is the configured table's key."""

    root: tuple[str, str]
    info: TableInfo
    definition: str | None = None  # a view's SELECT (pg_get_viewdef), with every name qualified
    # A parent a member inherits from or is a partition of, or a relation whose rule writes into a member:
    # the server takes a write into it to the protected relation.
    opaque: bool = False


@dataclass(frozen=True, slots=True)
class Family:
    members: tuple[Member, ...]
    namesakes: frozenset[tuple[str, str]]


async def _columns_of(conn: CatalogConnection, oids: list[int]) -> dict[int, list[ColumnInfo]]:
    columns: dict[int, list[ColumnInfo]] = {oid: [] for oid in oids}
    if oids:
        for r in await conn.fetch(_COLUMNS_SQL, oids, BYTEA_OID):
            columns[r["relid"]].append(
                ColumnInfo(
                    name=r["name"],
                    attnum=r["attnum"],
                    type_name=r["type_name"],
                    is_bytea=r["is_bytea"],
                    has_default=r["has_default"],
                    generated=r["generated"],
                    identity=r["identity"],
                )
            )
    return columns


async def read_family(conn: CatalogConnection, roots: dict[int, tuple[str, str]]) -> Family:
    """The family of each root (OID → configured key) and the relations sharing a member's name."""
    rows = await conn.fetch(_DESCENDANTS_SQL, list(roots)) if roots else []
    found: list[tuple[tuple[str, str], Any, str | None]] = [(roots[r["root"]], r, None) for r in rows]
    root_of: dict[int, tuple[str, str]] = dict(roots)
    root_of.update({r["oid"]: roots[r["root"]] for r in rows})
    opaque: set[int] = set()
    for r in await conn.fetch(_ANCESTORS_SQL, list(root_of)) if root_of else []:
        if r["oid"] not in root_of:
            root_of[r["oid"]] = root_of[r["origin"]]
            opaque.add(r["oid"])
            found.append((root_of[r["oid"]], r, None))
    frontier = list(root_of)
    # pg_get_viewdef qualifies every name not visible in the search_path: with an empty one, all of them.
    saved = await conn.fetch("SELECT pg_catalog.current_setting('search_path') AS path")
    await conn.fetch("SELECT pg_catalog.set_config('search_path', '', false)")
    try:
        for _ in range(_MAX_VIEW_DEPTH):
            if not frontier:
                break
            new: list[int] = []
            for w in await conn.fetch(_RULE_WRITERS_SQL, list(root_of)):
                if w["oid"] not in opaque:
                    opaque.add(w["oid"])
                    if w["oid"] not in root_of:
                        root_of[w["oid"]] = root_of[w["origin"]]
                        found.append((root_of[w["oid"]], w, None))
                        new.append(w["oid"])
            views = [v for v in await conn.fetch(_VIEWS_SQL, frontier) if v["oid"] not in root_of]
            frontier = new
            for v in views:
                if v["oid"] in root_of:
                    continue
                # A view over several protected tables gets the first one's root for its messages.
                bases = await conn.fetch(
                    "SELECT DISTINCT d.refobjid AS base FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r "
                    "ON r.oid = d.objid WHERE r.ev_class = $1 AND d.refobjid = ANY($2::oid[])",
                    v["oid"],
                    list(root_of),
                )
                root_of[v["oid"]] = root_of[min(b["base"] for b in bases)] if bases else next(iter(roots.values()))
                found.append((root_of[v["oid"]], v, v["definition"]))
                frontier.append(v["oid"])
    finally:
        await conn.fetch("SELECT pg_catalog.set_config('search_path', $1, false)", saved[0]["path"])
    columns = await _columns_of(conn, [r["oid"] for _, r, _ in found])
    members = tuple(
        Member(
            root,
            TableInfo(r["schema"], r["name"], r["oid"], r["relkind"], tuple(columns[r["oid"]]), ()),
            definition,
            r["oid"] in opaque,
        )
        for root, r, definition in found
    )
    names = sorted({m.info.name for m in members} | {name for _, name in roots.values()})
    namesakes = (
        frozenset((r["schema"], r["name"]) for r in await conn.fetch(_NAMESAKES_SQL, names)) if names else frozenset()
    )
    return Family(members, namesakes)


def resolve_family(catalog: Catalog, family: Family) -> tuple[Catalog, list[str]]:
    """``catalog`` (configured tables, resolved) with each table's family added, every member mapping
    its columns to the root's identity, and ``others`` set; one line per problem."""
    problems: list[str] = []
    tables = dict(catalog.tables)
    views: list[tuple[tuple[str, str], ProtectedTable, TableInfo, str]] = []
    for member in family.members:
        info = member.info
        key = (info.schema, info.name)
        root = catalog.tables.get(member.root)
        if root is None:
            continue
        if key in catalog.tables:
            problems.append(
                f"{info.qualified_name} is configured separately but belongs to the family of {root.qualified_name}, "
                "whose column identities it shares; configure only the root table"
            )
            continue
        if key in tables:
            continue  # reached from two roots (a view over two protected tables): the first one holds
        if member.opaque:
            # Its columns may hold rows of unprotected relations too: nothing is written through it (the
            # server would route, recurse or rewrite plaintext into the protected relation), nothing decrypted.
            log.info("%s writes into the family of %s and is opaque to pgveil", info.qualified_name,
                     root.qualified_name)  # fmt: skip
            member_table, member_problems = _member(root, info, {}, opaque=True), list[str]()
        elif member.definition is None:
            member_table, member_problems = _child(root, info)
        else:
            if all(v[0] != key for v in views):
                views.append((key, root, info, member.definition))
            continue
        problems.extend(member_problems)
        tables[key] = member_table
    _resolve_views(tables, views)
    protected = set(tables)
    others = frozenset(k for k in family.namesakes if k not in protected)
    return Catalog(tables, others), problems


def _resolve_views(
    tables: dict[tuple[str, str], ProtectedTable], views: list[tuple[tuple[str, str], ProtectedTable, TableInfo, str]]
) -> None:
    """Maps each view's columns with every other member known: a view's definition may name a member
    view found after it (a view over a view over the table that also names the table in a subquery is
    found in the first round, the view it reads from only in the second). Analysed again until no
    mapping changes; views that do not settle are opaque."""
    for _ in range(len(views) + 1):
        changed = False
        for key, root, info, definition in views:
            others = Catalog({k: t for k, t in tables.items() if k != key})
            table, _problems = _view(root, info, definition, others)
            if tables.get(key) != table:
                tables[key] = table
                changed = True
        if not changed:
            return
    for key, root, info, _definition in views:
        tables[key] = _member(root, info, {}, view=True, opaque=True)


def _child(root: ProtectedTable, info: TableInfo) -> tuple[ProtectedTable, list[str]]:
    """A partition or inheritance child: the root's protected columns, by name, at its own attnums."""
    problems: list[str] = []
    columns: dict[str, ProtectedColumn] = {}
    for name, column in root.columns.items():
        col = info.column(name)
        if col is None:
            problems.append(f"{info.qualified_name} (a child of {root.qualified_name}) lacks column {name}")
            col_attnum = 0
        else:
            if column.encrypted and not col.is_bytea:
                problems.append(
                    f"column {name} of {info.qualified_name} (a child of {root.qualified_name}) is {col.type_name}, "
                    "expected bytea"
                )
            col_attnum = col.attnum
        columns[name] = _member_column(column, info, name, col_attnum)
    return _member(root, info, columns), problems


def _view(root: ProtectedTable, info: TableInfo, definition: str, catalog: Catalog) -> tuple[ProtectedTable, list[str]]:
    """A view: each column that passes a protected column through maps to it; a definition pgveil
    cannot map column by column makes the view opaque (nothing decrypted, no writes through it)."""
    from proxy.rewrite.analysis import analyze  # the analysis imports the catalog, not this module

    plan = analyze(definition, catalog)
    st = plan.statements[0] if len(plan.statements) == 1 else None
    if (
        _reads_opaque(definition, catalog)  # a write through it would reach the opaque relation
        or st is None
        or st.refusal_reason is not None
        or st.result_columns is None
        or len(st.result_columns) != len(info.columns)
        or st.literal_targets
        or st.param_targets
    ):
        log.info("view %s over %s is opaque to pgveil", info.qualified_name, root.qualified_name)
        return _member(root, info, {}, view=True, opaque=True), []
    columns = {
        c.name: _member_column(p, info, c.name, c.attnum)
        for c, p in zip(info.columns, st.result_columns, strict=True)
        if p is not None
    }
    # What the definition does with a governed column other than pass it out is revealed by every read.
    uses = tuple(dict.fromkeys(r.column for r in st.references if r.kind is not ReferenceKind.OUTPUT))
    return dataclasses.replace(_member(root, info, columns, view=True), uses=uses), []


def _reads_opaque(definition: str, catalog: Catalog) -> bool:
    """Whether a view's definition names an opaque member of a protected family (True also if it
    cannot be parsed)."""
    try:
        tree = json.loads(pg_parser.parse_sql_json(definition))
    except Exception:  # pglast.parser.ParseError and the like: fail closed
        return True
    stack: list[Any] = [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            rv = n.get("RangeVar")
            if isinstance(rv, dict):
                table = catalog.lookup(rv.get("schemaname"), str(rv.get("relname", "")))
                if table is not None and table.opaque:
                    return True
            stack.extend(v for v in n.values() if isinstance(v, dict | list))
        elif isinstance(n, list):
            stack.extend(v for v in n if isinstance(v, dict | list))
    return False


def _member_column(column: ProtectedColumn, info: TableInfo, name: str, attnum: int) -> ProtectedColumn:
    return dataclasses.replace(
        column, schema=info.schema, table=info.name, name=name, attnum=attnum, table_oid=info.oid,
        identity=column.column_id,
    )  # fmt: skip


def _member(
    root: ProtectedTable,
    info: TableInfo,
    columns: dict[str, ProtectedColumn],
    *,
    view: bool = False,
    opaque: bool = False,
) -> ProtectedTable:
    return ProtectedTable(
        info.schema,
        info.name,
        columns,
        tuple(c.name for c in info.columns),
        info.oid,
        tuple(c.attnum for c in info.columns),
        root=root.qualified_name,
        view=view,
        opaque=opaque,
        subject=None if view or opaque else root.subject,  # writes through a view cannot name the subject
    )


async def load_catalog(
    conn: CatalogConnection,
    configured: Catalog,
    previous: Catalog | None = None,
    migrating: Mapping[str, str] | None = None,
) -> tuple[Catalog, list[str]]:
    """The configured catalog completed from the server's catalog (with every protected table's family
    and the relations sharing their names), plus the problems found. ``previous`` is the catalog read
    last time, so that renamed tables and columns are followed (see resolve_catalog)."""
    follow = (
        {t.configured_as or k: t.oid for k, t in previous.tables.items() if t.oid and t.root is None}
        if previous is not None
        else {}
    )
    found = await read_tables(conn, configured.tables, follow)
    catalog, problems = resolve_catalog(configured, found, previous, migrating)
    roots = {t.oid: key for key, t in catalog.tables.items() if t.oid and t.root is None}
    family = await read_family(conn, roots)
    catalog, family_problems = resolve_family(catalog, family)
    problems.extend(family_problems)
    log.debug("catalog read: %d protected relations, %d problems", len(catalog.tables), len(problems))
    return catalog, problems


_SUBJECT_DEFAULT_SQL = """
WITH RECURSIVE family(relid) AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = $2
    UNION SELECT i.inhrelid FROM pg_inherits i JOIN family f ON i.inhparent = f.relid
)
SELECT a.attidentity::text AS identity, a.attgenerated::text AS generated,
       CASE WHEN a.attidentity <> '' THEN
            format('nextval(%L::regclass)', pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname))
       ELSE pg_get_expr(d.adbin, d.adrelid) END AS expression,
       EXISTS (SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid IN (SELECT relid FROM family)
               AND (t.tgtype & 3) = 3 AND (t.tgtype & 4) <> 0) AS before_insert_trigger,
       EXISTS (SELECT 1 FROM pg_trigger t
               WHERE t.tgrelid IN (SELECT relid FROM family)
               AND (t.tgtype & 3) = 3 AND (t.tgtype & 20) <> 0) AS before_write_trigger
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $3 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = $1 AND c.relname = $2
"""


async def read_subject_default(conn: CatalogConnection, schema: str, table: str, column: str) -> ColumnDefault | None:
    """What the database stores in a subject column an INSERT leaves out (a
    :class:`proxy.encrypt.subjectgen.ColumnDefault`), read with schema-qualified names so that the
    client's search_path cannot change which sequence or function it names; None when the column does
    not exist. A table with a BEFORE INSERT row trigger, on itself or on any of its partitions (a row
    routed there fires it), is reported as one whose subject pgveil cannot be certain of (the trigger may
    change the id after pgveil chose the key). A BEFORE INSERT or UPDATE row trigger (tgtype bits ROW=1,
    BEFORE=2, INSERT=4, UPDATE=16; disabled ones too: the owner can enable them any time) on the table or
    any descendant (partitions and inheritance children, by pg_inherits) is reported too: it could change
    a client-given id after pgveil sealed the row's values for it. PostgreSQL's internal FK triggers are
    AFTER triggers, so the bits leave them out."""
    rows = await conn.fetch(_SUBJECT_DEFAULT_SQL, schema, table, column)
    if not rows:
        return None
    row = rows[0]
    return ColumnDefault(
        row["expression"],
        identity=row["identity"] or "",
        generated=row["generated"] or "",
        before_insert_trigger=bool(row["before_insert_trigger"]),
        before_write_trigger=bool(row["before_write_trigger"]),
    )


async def read_subject_defaults(conn: Any, catalog: Catalog) -> dict[str, ColumnDefault]:
    """:func:`read_subject_default` of every configured table with per-subject keys, by qualified name,
    read in one transaction whose ``search_path`` is ``pg_catalog`` alone, so that ``pg_get_expr`` names
    every object outside ``pg_catalog`` with its schema (the default is later evaluated in the client's
    session, under the client's ``search_path``). ``conn`` is an asyncpg connection."""
    tables = [t for t in catalog.tables.values() if t.subject is not None and t.root is None and t.oid]
    if not tables:
        return {}
    found: dict[str, ColumnDefault] = {}
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL search_path TO pg_catalog")
        for t in tables:
            assert t.subject is not None
            default = await read_subject_default(conn, t.schema, t.name, t.subject.column)
            if default is not None:
                found[t.qualified_name] = default
    return found
