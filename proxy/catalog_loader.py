"""Reads the server catalog for the protected tables and joins it with the configured catalog.

``read_tables`` is the only I/O here (three catalog queries over the service connection, whatever the
number of tables); ``resolve_catalog`` is the pure join that fills in table OIDs, attribute numbers and
column order, and names every mismatch between configuration and database. ``proxy.schema`` reuses
both. This module never changes the database and never reads table contents.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.rewrite.catalog import Catalog, ProtectedTable

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


async def read_tables(conn: CatalogConnection, names: Iterable[tuple[str, str]]) -> dict[tuple[str, str], TableInfo]:
    """The relations among ``names`` (``(schema, table)``) that exist, keyed like ``names``."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return {}
    rels = await conn.fetch(_TABLES_SQL, [s for s, _ in wanted], [t for _, t in wanted])
    oids = [r["oid"] for r in rels]
    columns: dict[int, list[ColumnInfo]] = {oid: [] for oid in oids}
    constraints: dict[int, list[ConstraintInfo]] = {oid: [] for oid in oids}
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
        for r in await conn.fetch(_CONSTRAINTS_SQL, oids):
            constraints[r["relid"]].append(ConstraintInfo(r["name"], r["kind"], r["validated"]))
    return {
        (r["schema"], r["name"]): TableInfo(
            schema=r["schema"],
            name=r["name"],
            oid=r["oid"],
            relkind=r["relkind"],
            columns=tuple(columns[r["oid"]]),
            constraints=tuple(constraints[r["oid"]]),
        )
        for r in rels
    }


def resolve_catalog(configured: Catalog, found: dict[tuple[str, str], TableInfo]) -> tuple[Catalog, list[str]]:
    """``configured`` with what the server knows filled in, and one line per mismatch.

    Every configured table and column stays in the result, even when the server lacks it: the
    rewriter must keep treating the name as protected (fail closed) rather than forget it.
    """
    problems: list[str] = []
    tables: dict[tuple[str, str], ProtectedTable] = {}
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
        for name, column in table.columns.items():
            col = info.column(name)
            if col is None:
                problems.append(f"column {column.column_id} does not exist; run `pgveil schema apply`")
                columns[name] = column
                continue
            if not col.is_bytea:
                problems.append(
                    f"column {column.column_id} is {col.type_name}, expected bytea; run `pgveil schema apply`"
                )
            columns[name] = dataclasses.replace(column, attnum=col.attnum, table_oid=info.oid)
        tables[key] = dataclasses.replace(
            table, columns=columns, all_columns=tuple(c.name for c in info.columns), oid=info.oid
        )
    return Catalog(tables), problems


async def load_catalog(conn: CatalogConnection, configured: Catalog) -> tuple[Catalog, list[str]]:
    """The configured catalog completed from the server's catalog, plus the problems found."""
    found = await read_tables(conn, configured.tables)
    catalog, problems = resolve_catalog(configured, found)
    log.debug("catalog read: %d protected tables, %d problems", len(catalog.tables), len(problems))
    return catalog, problems
