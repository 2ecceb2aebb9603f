"""What the proxy knows about protected relations: the pure data the analysis and the rewriter use.

Built from the configuration (``tables:``) joined with the server's catalog (table OIDs, attribute
numbers) by the service connection. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ProtectedColumn:
    """One encrypted column.

    ``declared_type`` is the type the application sees (a name from the config, e.g. ``"text"``,
    ``"varchar(20)"``, ``"numeric"``); in the database the column is ``bytea``.
    ``attnum`` and ``table_oid`` are 0 until the catalog has been read.
    """

    schema: str
    table: str
    name: str
    declared_type: str
    attnum: int = 0
    table_oid: int = 0

    @property
    def column_id(self) -> str:
        """``schema.table.column``: the column's identity in associated data and key scope."""
        return f"{self.schema}.{self.table}.{self.name}"


@dataclass(frozen=True, slots=True)
class ProtectedTable:
    """A table with at least one protected column.

    ``all_columns`` lists every column of the table in attribute order (protected or not), which an
    ``INSERT`` without a column list, ``SELECT *`` and ``COPY`` without a column list need.
    """

    schema: str
    name: str
    columns: dict[str, ProtectedColumn]
    all_columns: tuple[str, ...] = ()
    oid: int = 0

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Catalog:
    """Every protected table, by ``(schema, table)``, and by OID once the catalog is read."""

    tables: dict[tuple[str, str], ProtectedTable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_oid: dict[int, ProtectedTable] = {t.oid: t for t in self.tables.values() if t.oid}
        object.__setattr__(self, "_by_oid", by_oid)

    def lookup(
        self, schema: str | None, table: str, search_path: tuple[str, ...] = ("public",)
    ) -> ProtectedTable | None:
        """Resolves a possibly unqualified table name the way PostgreSQL would for protected tables."""
        if schema is not None:
            return self.tables.get((schema, table))
        for s in search_path:
            t = self.tables.get((s, table))
            if t is not None:
                return t
        return None

    def by_oid(self, oid: int) -> ProtectedTable | None:
        return self._by_oid.get(oid)  # type: ignore[attr-defined,no-any-return]

    def column_by_attr(self, table_oid: int, attnum: int) -> ProtectedColumn | None:
        """The protected column behind a RowDescription field (table OID, attribute number), if any."""
        t = self.by_oid(table_oid)
        if t is None:
            return None
        for c in t.columns.values():
            if c.attnum == attnum:
                return c
        return None

    @property
    def empty(self) -> bool:
        return not self.tables
