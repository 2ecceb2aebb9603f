"""Name resolution for the analysis: which relation and column a column reference means, the way
PostgreSQL resolves it (innermost query level first, table aliases, CTEs shadowing tables).

pgveil knows the columns of protected tables (from the catalog) and of the subqueries and CTEs it has
analysed, but not the columns of other tables. A relation whose columns are unknown may or may not
have a column of a given name; when that decides whether a reference means a protected column, the
reference is marked uncertain and the analysis refuses to use it rather than guess (fail closed).

Must not: walk parse trees (analysis.py does) or refuse anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from proxy.rewrite.catalog import ProtectedColumn, ProtectedTable


@dataclass(frozen=True, slots=True)
class OutColumn:
    """One column of a relation or of a query result.

    ``traced``: RowDescription reports this column's origin (table OID, attribute number) when it is a
    plain column reference; a set operation loses the origin. ``certain`` is False when the reference
    that produced the column could have meant a column of a relation pgveil does not know.
    ``null_literal``: the column is a bare NULL, which a UNION ALL may combine with any column.
    """

    name: str | None
    column: ProtectedColumn | None = None
    traced: bool = True
    certain: bool = True
    null_literal: bool = False


@dataclass(frozen=True, slots=True)
class UnknownColumns:
    """A run of columns pgveil cannot count (``*`` over a table not in the catalog, a function in FROM).

    ``protected`` lists protected columns that are somewhere in the run: a protected table whose
    column list the catalog lacks.
    """

    protected: tuple[ProtectedColumn, ...] = ()
    traced: bool = True


Shape = tuple[OutColumn | UnknownColumns, ...]

UNKNOWN_SHAPE: Shape = (UnknownColumns(),)


def shape_protected(shape: Shape) -> list[ProtectedColumn]:
    out: list[ProtectedColumn] = []
    for c in shape:
        if isinstance(c, OutColumn):
            if c.column is not None:
                out.append(c.column)
        else:
            out.extend(c.protected)
    return out


def shape_is_exact(shape: Shape) -> bool:
    return all(isinstance(c, OutColumn) for c in shape)


def known_columns(table: ProtectedTable) -> tuple[str, ...] | None:
    """The table's columns in attribute order, or None if the catalog has no (trustworthy) list: one
    that lacks a protected column would misplace values by position."""
    if table.all_columns and set(table.columns) <= set(table.all_columns):
        return table.all_columns
    return None


def table_shape(table: ProtectedTable) -> Shape:
    columns = known_columns(table)
    if columns is not None:
        return tuple(OutColumn(name, table.columns.get(name)) for name in columns)
    return (UnknownColumns(tuple(table.columns.values())),)


class Lookup(Enum):
    FOUND = 1
    ABSENT = 2
    UNKNOWN = 3  # the relation's columns are not all known; it may have this one


@dataclass(eq=False, slots=True)
class Relation:
    """A FROM item visible by name (a table, an alias, a subquery, a CTE reference)."""

    refname: str | None
    shape: Shape
    schema: str | None = None  # set for a table referenced without alias: ``schema.table.col`` works
    table: ProtectedTable | None = None

    def lookup(self, name: str) -> tuple[Lookup, OutColumn | None]:
        for c in self.shape:
            if isinstance(c, OutColumn):
                if c.name == name:
                    return Lookup.FOUND, c
            else:
                for p in c.protected:
                    if p.name == name:
                        return Lookup.FOUND, OutColumn(name, p, c.traced)
        if shape_is_exact(self.shape):
            return Lookup.ABSENT, None
        return Lookup.UNKNOWN, None

    @property
    def has_protected(self) -> bool:
        return bool(shape_protected(self.shape))


@dataclass(frozen=True, slots=True)
class ColumnUse:
    """A column reference that (possibly) means a protected column.

    ``extra_fields``: the reference selects a field of the column (``ssn.x``). ``whole_row``: the
    reference is a whole row of a relation that has protected columns (``SELECT c FROM customers c``).
    """

    column: ProtectedColumn
    relation: Relation | None
    certain: bool = True
    traced: bool = True
    reference: str = ""
    extra_fields: bool = False
    whole_row: bool = False

    @property
    def plain(self) -> bool:
        """A reference to the column's value itself, not a field of it and not a whole row."""
        return not (self.extra_fields or self.whole_row)


@dataclass(eq=False, slots=True)
class Level:
    """The FROM items of one query level; ``parent`` is the enclosing query (for correlated references),
    ``ctes`` the CTE names visible to subqueries written at this level."""

    ctes: CteScope
    parent: Level | None = None
    relations: list[Relation] = field(default_factory=list)
    star: list[Shape] = field(default_factory=list)  # what ``*`` expands to, one entry per FROM item

    def add(self, relation: Relation, *, in_star: bool = True) -> None:
        self.relations.append(relation)
        if in_star:
            self.star.append(relation.shape)

    def find_relation(self, name: str, schema: str | None = None) -> Relation | None:
        level: Level | None = self
        while level is not None:
            for r in level.relations:
                if r.refname == name and (schema is None or r.schema == schema):
                    return r
            level = level.parent
        return None

    def resolve(self, fields: list[str]) -> ColumnUse | None:
        """The protected column a ColumnRef (without ``*``) means, or None if it means none.

        Follows transformColumnRef in PostgreSQL's parse_expr.c: ``a`` is a column; ``a.b`` is column b
        of relation a, else field b of column a; ``a.b.c`` is schema.relation.column, else
        relation.column.field, else column.field.field.
        """
        reference = ".".join(fields)
        if len(fields) >= 3:
            rel = self.find_relation(fields[-2], fields[-3])
            if rel is not None:
                return self._in_relation(rel, fields[-1], reference, extra=False)
        if len(fields) >= 2:
            rel = self.find_relation(fields[0])
            if rel is not None:
                return self._in_relation(rel, fields[1], reference, extra=len(fields) > 2)
        return self._unqualified(fields[0], reference, extra=len(fields) > 1)

    def _in_relation(self, rel: Relation, name: str, reference: str, *, extra: bool) -> ColumnUse | None:
        status, col = rel.lookup(name)
        if status is Lookup.FOUND and col is not None and col.column is not None:
            return ColumnUse(col.column, rel, col.certain, col.traced, reference, extra_fields=extra)
        return None

    def _unqualified(self, name: str, reference: str, *, extra: bool) -> ColumnUse | None:
        level: Level | None = self
        certain = True
        while level is not None:
            unknown = False
            for rel in level.relations:
                status, col = rel.lookup(name)
                if status is Lookup.FOUND and col is not None:
                    if col.column is None:
                        return None
                    return ColumnUse(col.column, rel, certain and col.certain, col.traced, reference, extra)
                if status is Lookup.UNKNOWN:
                    unknown = True
            if unknown:
                certain = False
            level = level.parent
        # No column of that name anywhere: PostgreSQL then reads it as a whole-row reference.
        row = self.find_relation(name)
        if row is not None:
            protected = shape_protected(row.shape)
            if protected:
                return ColumnUse(protected[0], row, certain, False, reference, extra, whole_row=True)
        return None


@dataclass(frozen=True, slots=True)
class CteEntry:
    shape: Shape | None  # None: declared in WITH RECURSIVE but not analysed yet (forward reference)
    name: str


@dataclass(frozen=True, slots=True)
class CteScope:
    """CTE names visible at a point of the statement, innermost WITH first."""

    names: dict[str, CteEntry] = field(default_factory=dict)
    parent: CteScope | None = None

    def find(self, name: str) -> CteEntry | None:
        scope: CteScope | None = self
        while scope is not None:
            entry = scope.names.get(name)
            if entry is not None:
                return entry
            scope = scope.parent
        return None


def rename(shape: Shape, colnames: list[str]) -> Shape | None:
    """Applies an alias column list (``AS s(a, b)``) positionally; None if a run of unknown columns
    comes before the last renamed position, so positions cannot be matched."""
    if not colnames:
        return shape
    out: list[OutColumn | UnknownColumns] = []
    for i, c in enumerate(shape):
        if i < len(colnames):
            if not isinstance(c, OutColumn):
                return None
            out.append(OutColumn(colnames[i], c.column, c.traced, c.certain))
        else:
            out.append(c)
    return tuple(out)
