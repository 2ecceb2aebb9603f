"""What the proxy knows about protected relations: the pure data the analysis and the rewriter use.

Built from the configuration (``tables:``) joined with the server's catalog (table OIDs, attribute
numbers) by the service connection. No I/O here.

Name resolution does not depend on the session's ``search_path``: PostgreSQL 15 does not report it,
and it changes through SET, SET LOCAL, rolled-back transactions, startup options, role and database
defaults and ``set_config``, none of which pgveil can follow with certainty. Instead an unqualified
name means every relation of that name in any schema (``"$user"``, ``pg_catalog`` searched first
implicitly and ``pg_temp`` searched before everything included). If that is exactly one protected
relation, the name is that relation; if it could also be another protected relation or a relation
pgveil knows is not protected (``others``), the name is ambiguous and the analysis refuses whatever
would seal, decrypt or be refused through it.

A protected table's *family* is protected with it: its partitions and inheritance children (at any
depth) and the views over it. A member is a :class:`ProtectedTable` of its own name, OID and
attribute numbers whose :class:`ProtectedColumn` entries keep the root's identity (``column_id``), so
a value written through a child reads back through the parent and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.errors import FeatureNotSupported, RefusalReason


class CatalogStale(FeatureNotSupported):
    """A statement names a column of a protected relation that pgveil's catalog lacks: the catalog is
    older than the database (DDL made elsewhere); refused until it is read again."""

    sqlstate = "55000"
    reason = RefusalReason.STALE_CATALOG


@dataclass(frozen=True, slots=True)
class ProtectedColumn:
    """One governed column: encrypted (``encrypted``, the default) or plain (visibility policy only).

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
    identity: str = ""  # a family member's column: the root column's column_id
    encrypted: bool = True  # False: a plain column in the database, governed by visibility policy only
    # Per-subject keys: the subject kind of its table (``tables.<t>.subject.kind``), None for a column key.
    subject_kind: str | None = None

    @property
    def column_id(self) -> str:
        """``schema.table.column``: the column's identity in associated data and key scope (the
        configured table's column, also for the same column seen through a partition, child or view)."""
        return self.identity or f"{self.schema}.{self.table}.{self.name}"


SUBJECT_TYPES = ("integer", "uuid", "text")
"""The classes of a subject column's type: int2/int4/int8, uuid, text-like (text, varchar). Every table of
one subject kind must use the same class, so that one subject has one canonical id."""


@dataclass(frozen=True, slots=True)
class SubjectColumn:
    """A table's data subject (``tables.<t>.subject``): the column whose value names the subject of each
    row, and the subject's kind (tables of one kind share each subject's key). ``type_class`` is one of
    :data:`SUBJECT_TYPES`, read from the database ("" until the catalog is read)."""

    kind: str
    column: str
    type_class: str = ""


@dataclass(frozen=True, slots=True)
class ProtectedTable:
    """A table with at least one protected column.

    ``all_columns`` lists every column of the table in attribute order (protected or not), which an
    ``INSERT`` without a column list, ``SELECT *`` and ``COPY`` without a column list need.

    ``root`` is the configured table's qualified name for a member of its family (a partition, an
    inheritance child or a view), None for the configured table itself. ``view`` marks a view;
    ``opaque`` a view whose definition pgveil could not map column by column, or a parent that a
    member inherits from or is a partition of (the server routes an INSERT into it, and recurses an
    UPDATE of it, into the protected member): nothing may be written through it and none of its
    columns is decrypted.

    ``uses`` are the governed columns a mapped view's definition uses other than by passing them into
    one of its columns (``lower(phone)``, ``WHERE city = 'x'``): reading the view reveals something of
    them, so each read is an EXPRESSION reference to each (a restricted role is refused).
    """

    schema: str
    name: str
    columns: dict[str, ProtectedColumn]
    all_columns: tuple[str, ...] = ()
    oid: int = 0
    attnums: tuple[int, ...] = ()  # the attribute number of each of ``all_columns``
    root: str | None = None
    view: bool = False
    opaque: bool = False
    configured_as: tuple[str, str] | None = None  # the configured name of a table renamed since
    uses: tuple[ProtectedColumn, ...] = ()
    subject: SubjectColumn | None = None  # per-subject keys for its encrypted columns

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def encrypted(self) -> bool:
        """Whether any of its governed columns is encrypted (else it only has plain governed columns)."""
        return any(c.encrypted for c in self.columns.values())


def is_temp_schema(schema: str | None) -> bool:
    """``pg_temp`` (the session's temporary schema, by its alias) or ``pg_temp_N`` itself."""
    return schema is not None and (schema == "pg_temp" or schema.startswith("pg_temp_"))


@dataclass(frozen=True)
class Catalog:
    """Every protected relation (configured tables and their families), by ``(schema, name)`` and by
    OID once the catalog is read; ``others`` are the relations pgveil knows are not protected but share
    a name with a protected one."""

    tables: dict[tuple[str, str], ProtectedTable] = field(default_factory=dict)
    others: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        by_oid: dict[int, ProtectedTable] = {t.oid: t for t in self.tables.values() if t.oid}
        by_name: dict[str, list[ProtectedTable]] = {}
        for key in sorted(self.tables):
            by_name.setdefault(key[1], []).append(self.tables[key])
        other_names: dict[str, list[str]] = {}
        for schema, name in sorted(self.others):
            other_names.setdefault(name, []).append(f"{schema}.{name}")
        object.__setattr__(self, "_by_oid", by_oid)
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_other_names", other_names)

    @property
    def names(self) -> frozenset[str]:
        """The relation names (unqualified) of every protected relation."""
        return frozenset(self._by_name)  # type: ignore[attr-defined]

    def lookup(self, schema: str | None, table: str) -> ProtectedTable | None:
        """The protected relation a possibly unqualified name may mean, whatever the search_path (see
        the module docstring); :meth:`ambiguity` says whether it may also mean another relation."""
        if schema is not None and not is_temp_schema(schema):
            return self.tables.get((schema, table))
        candidates: list[ProtectedTable] = self._by_name.get(table, [])  # type: ignore[attr-defined]
        return candidates[0] if candidates else None

    def ambiguity(self, schema: str | None, table: str) -> str | None:
        """Why a name that :meth:`lookup` resolves to a protected relation may mean another relation,
        or None if it cannot."""
        if schema is not None and not is_temp_schema(schema):
            return None
        candidates: list[ProtectedTable] = self._by_name.get(table, [])  # type: ignore[attr-defined]
        if not candidates:
            return None
        protected = ", ".join(t.qualified_name for t in candidates)
        if schema is not None:
            return f"{schema}.{table} is a temporary table that shadows {protected}, which has encrypted columns"
        others: list[str] = self._other_names.get(table, [])  # type: ignore[attr-defined]
        if len(candidates) > 1 or others:
            names = [t.qualified_name for t in candidates] + others
            return f'table name "{table}" may refer to any of {", ".join(names)} ({protected} with encrypted columns)'
        return None

    def several_protected(self, schema: str | None, table: str) -> bool:
        """An unqualified name that may mean more than one protected relation."""
        if schema is not None and not is_temp_schema(schema):
            return False
        return len(self._by_name.get(table, [])) > 1  # type: ignore[attr-defined]

    def root_of(self, table: ProtectedTable) -> ProtectedTable:
        """The configured table a family member belongs to (``table`` itself for a configured table)."""
        if table.root is None:
            return table
        for t in self.tables.values():
            if t.root is None and t.qualified_name == table.root:
                return t
        return table

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
