"""The statement walker: resolves names the way PostgreSQL's parse analysis does and classifies every
use of a governed column (see analysis.py for the theory of operation).

Every use that may run is recorded as a Reference (``StatementWalker.references``); a use of an
encrypted column that no role may make raises FeatureNotSupported at the first such construct, and
analysis.py turns that into the statement's refusal. A plain governed column never raises.

Must not: do I/O, put literal values in messages, or depend on the role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.errors import FeatureNotSupported
from proxy.policy.model import Reference, ReferenceKind
from proxy.rewrite import refusals
from proxy.rewrite.catalog import Catalog, CatalogStale, ProtectedColumn, ProtectedTable
from proxy.rewrite.constructs import (
    AGGREGATES,
    NODE_CONSTRUCTS,
    SQL_TEXT_FUNCTIONS,
    WHOLE_DATABASE_FUNCTIONS,
    describe_value,
    figure_name,
    operator_construct,
)
from proxy.rewrite.copy_statement import parse_copy_options
from proxy.rewrite.literals import (
    Constant,
    DefaultValue,
    NullValue,
    ParamValue,
    SourceText,
    classify_value,
    type_name_text,
)
from proxy.rewrite.nodes import (
    Node,
    column_fields,
    first_protected_table,
    function_calls,
    is_constant,
    is_wrapped,
    last_name,
    names_of,
    node_type,
    relation_names,
    tables_named_in_strings,
)
from proxy.rewrite.plan import CopyDirection, CopyFormat, CopyPlan, HiddenOutput, LiteralTarget, SubjectValue, TextEdit
from proxy.rewrite.scope import (
    UNKNOWN_SHAPE,
    ColumnUse,
    CteEntry,
    CteScope,
    Level,
    OutColumn,
    Relation,
    Shape,
    UnknownColumns,
    known_columns,
    rename,
    shape_is_exact,
    shape_protected,
    table_shape,
)

# The constructs of an INSERT that leaves a row's subject column to the database (refusals.SubjectNotGiven:
# the session may supply the ids the database makes, see proxy/encrypt/subjectgen.py).
_NOT_NAMED = "an INSERT whose column list does not name "
_GENERATABLE = frozenset({"DEFAULT"})


@dataclass(frozen=True, slots=True)
class WalkResult:
    """What a statement returns: result columns, or a COPY plan."""

    result_columns: tuple[ProtectedColumn | None, ...] | None = None
    via_row_description: bool = False
    copy: CopyPlan | None = None
    cursor: str | None = None
    cursor_columns: tuple[ProtectedColumn | None, ...] | None = None


@dataclass(frozen=True, slots=True)
class _Assignments:
    """The protected column (or None) fed by each position of an INSERT's VALUES or SELECT list."""

    columns: tuple[ProtectedColumn | None, ...]

    def at(self, position: int) -> ProtectedColumn | None:
        return self.columns[position] if position < len(self.columns) else None

    def first_from(self, position: int) -> ProtectedColumn | None:
        return next((c for c in self.columns[position:] if c is not None), None)


class StatementWalker:
    """Walks one statement; collects literal targets, edits and parameter uses; raises a refusal."""

    def __init__(self, catalog: Catalog, source: SourceText) -> None:
        self.catalog = catalog
        self.source = source
        self.touched = False
        # Names that may mean another relation than the protected one they were resolved to (see
        # Catalog.ambiguity); ``ambiguous_always``: one may be another protected relation, so even a
        # statement that seals nothing through the first may seal the wrong thing through the other.
        self.ambiguous: list[str] = []
        self.ambiguous_always = False
        self.literals: list[LiteralTarget] = []
        self.edits: list[TextEdit] = []
        self.params: dict[int, list[ProtectedColumn | None]] = {}
        self._multiexpr: dict[int, Shape] = {}
        self._references: dict[Reference, None] = {}  # insertion-ordered, without duplicates
        # Per-subject keys: the data subject of the row whose values are being assigned (None: not known,
        # and ``_subject_why`` names the construct for the refusal), and where each $n's subject comes from.
        self._row_subject: SubjectValue | None = None
        self._subject_why = "this statement"
        self._subject_at: int | None = None  # the subject column's position in an INSERT's VALUES rows
        self._subject_table: ProtectedTable | None = None
        self.param_subjects: dict[int, SubjectValue] = {}
        # The top-level SELECT whose list entries may become HiddenOutputs, and those entries.
        self._hide_body: Node | None = None
        self.hidden: list[HiddenOutput] = []

    # references to governed columns

    @property
    def references(self) -> tuple[Reference, ...]:
        return tuple(self._references)

    def refer(self, column: ProtectedColumn, kind: ReferenceKind, construct: str) -> None:
        self._references.setdefault(Reference(column, kind, construct), None)

    def use_column(self, use: ColumnUse, construct: str, clause: str | None = None) -> None:
        """A column reference used in an expression (anything but passing it into a result, writing it,
        or nullness): refused (0A000) for an encrypted column, whose ciphertext is all the server has;
        an EXPRESSION reference for a plain one (the role's grant decides). A whole-row reference uses
        every governed column of its relation."""
        columns = self._use_columns(use)
        encrypted = next((c for c in columns if c.encrypted), None)
        if encrypted is not None:
            raise refusals.column_use(dataclasses.replace(use, column=encrypted), construct, clause)
        where = refusals.where(construct, clause)
        if use.whole_row:
            label = f"whole-row reference (in {where})"
        elif use.extra_fields:
            label = refusals.where("field selection", clause)
        else:
            label = where
        for c in columns:
            self.refer(c, ReferenceKind.EXPRESSION, label)

    def use_governed(
        self, columns: Iterable[ProtectedColumn], construct: str, clause: str | None = None, *, certain: bool = True,
        reference: str = "",
    ) -> None:  # fmt: skip
        """Governed columns that reach ``construct`` other than through a column reference (a subquery's
        result, an output column by name or position): as :meth:`use_column`."""
        for c in columns:
            self.use_column(ColumnUse(c, None, certain, reference=reference), construct, clause)

    def note_nullness(self, node: Node, level: Level, construct: str) -> None:
        """``col IS NULL``, ``count(col)``: allowed today for every column (nullness is not encrypted), an
        EXPRESSION reference for the role to decide."""
        fields, star = column_fields(node_type(node)[1])
        if star:
            columns = shape_protected(self.star(node_type(node)[1], level))
        else:
            use = level.resolve(fields)
            columns = self._use_columns(use) if use is not None else []
        for c in columns:
            self.refer(c, ReferenceKind.EXPRESSION, construct)

    @staticmethod
    def _use_columns(use: ColumnUse) -> list[ProtectedColumn]:
        if use.whole_row and use.relation is not None:
            return list(dict.fromkeys(shape_protected(use.relation.shape))) or [use.column]
        return [use.column]

    def root_columns(self, table: ProtectedTable) -> list[ProtectedColumn]:
        """The governed columns of a family member's configured (root) table; its own for a root."""
        return list(self.catalog.root_of(table).columns.values())

    def read_opaque(self, table: ProtectedTable) -> None:
        """Reading an opaque member of a family (a view pgveil cannot map, a parent of a member): its
        values are not attributed, so every governed column of the root is an EXPRESSION reference. A
        mapped view whose definition uses governed columns (``lower(phone)``, a WHERE) reveals
        something of each at every read: EXPRESSION references too."""
        if table.opaque:
            label = f"opaque {'view' if table.view else 'relation'} {table.qualified_name}"
            for c in self.root_columns(table):
                self.refer(c, ReferenceKind.EXPRESSION, label)
        for c in table.uses:
            self.refer(c, ReferenceKind.EXPRESSION, f"view {table.qualified_name} (its definition uses the column)")

    # statements

    def statement(self, name: str, body: Node, table: ProtectedTable) -> WalkResult:
        """``table`` is a protected table the statement references (for messages about whole statements)."""
        if name == "SelectStmt" and body.get("intoClause"):
            self._no_protected_output(self.select(body, None, CteScope()), "SELECT INTO")
            return WalkResult()
        if name in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            if name == "SelectStmt":
                self._hide_body = body
            result = self._result(self.dml_or_select(name, body, CteScope()))
            if result.result_columns is None:
                self.hidden.clear()  # a result only RowDescription can map: no substitution
            return result
        if name == "CopyStmt":
            return self.copy(body)
        if name == "ExplainStmt":
            inner_name, inner = node_type(body.get("query", {}))
            self.statement(inner_name, inner, table)
            self.hidden.clear()  # EXPLAIN returns a plan, not the query's columns
            return WalkResult(result_columns=(None,))
        if name == "PrepareStmt":
            return self.prepare(body, table)
        if name == "DeclareCursorStmt":
            return self.declare_cursor(body)
        if name == "CreateTableAsStmt":
            inner_name, inner = node_type(body.get("query", {}))
            shape = self.dml_or_select(inner_name, inner, CteScope())
            self._no_protected_output(shape, "CREATE TABLE AS")
            return WalkResult()
        if name == "ViewStmt":
            inner_name, inner = node_type(body.get("query", {}))
            self.dml_or_select(inner_name, inner, CteScope())
            self.touched = True
            return WalkResult()
        if name == "DoStmt":
            raise refusals.statement(
                f"a DO block that mentions table {table.qualified_name}, which has encrypted columns, cannot be "
                "analysed",
                hint="run its statements one by one",
            )
        # DDL, TRUNCATE, maintenance: the server handles them on ciphertext; nothing to rewrite.
        self.touched = True
        return WalkResult()

    def declare_cursor(self, body: Node) -> WalkResult:
        """``DECLARE c CURSOR FOR <query>``: the query is analysed like a SELECT; its rows come later from
        FETCH, which is not analysed, so each governed result column must be one that FETCH's
        RowDescription names (table OID, attribute number): a plain column reference, passed through
        subqueries and CTEs at most."""
        inner_name, inner = node_type(body.get("query", {}))
        if inner_name != "SelectStmt":
            raise refusals.statement(f"a {inner_name} inside DECLARE CURSOR cannot be analysed")
        shape = self.select(inner, None, CteScope())
        cursor = str(body.get("portalname", ""))
        for c in shape:
            governed = c.protected if isinstance(c, UnknownColumns) else (c.column,) if c.column is not None else ()
            certain = c.certain if isinstance(c, OutColumn) else True
            if c.traced and certain:
                continue
            for col in governed:
                if col.encrypted:
                    raise refusals.statement(
                        f"DECLARE CURSOR {cursor}: column {col.column_id} passes through a construct whose origin "
                        "the FETCH cannot show, so pgveil could not decrypt it",
                        hint="select the column itself (not through UNION or an ambiguous name), or run the query "
                        "without a cursor",
                    )
                self.refer(col, ReferenceKind.EXPRESSION, "DECLARE CURSOR (a result column FETCH cannot attribute)")
        columns = tuple(c.column for c in shape if isinstance(c, OutColumn)) if shape_is_exact(shape) else None
        return WalkResult(cursor=cursor, cursor_columns=columns)

    def prepare(self, body: Node, table: ProtectedTable) -> WalkResult:
        inner_name, inner = node_type(body.get("query", {}))
        shape = self.dml_or_select(inner_name, inner, CteScope()) or ()
        targets = self.param_targets()
        if targets:
            n, col = min(targets.items())
            raise refusals.statement(
                f"SQL-level PREPARE with parameter ${n} for encrypted column {col.column_id} is not supported; "
                "use protocol-level prepared statements",
                hint="the driver's prepare (Parse/Bind) lets pgveil encrypt the parameter",
            )
        for c in shape:
            if isinstance(c, OutColumn) and c.column is not None and not (c.traced and c.certain):
                if not c.column.encrypted:
                    # EXECUTE is not analysed: only RowDescription can attribute its result columns.
                    self.refer(c.column, ReferenceKind.EXPRESSION, "SQL-level PREPARE (a result column EXECUTE "
                               "cannot attribute)")  # fmt: skip
                    continue
                raise refusals.statement(
                    f"SQL-level PREPARE of a query whose result column {c.column.column_id} pgveil can only track "
                    "from the statement text is not supported",
                    hint="use protocol-level prepared statements (the driver's prepare)",
                )
        return WalkResult()

    def dml_or_select(self, name: str, body: Node, ctes: CteScope) -> Shape | None:
        if name == "SelectStmt":
            return self.select(body, None, ctes)
        if name == "InsertStmt":
            return self.insert(body, ctes)
        if name == "UpdateStmt":
            return self.update(body, ctes)
        if name == "DeleteStmt":
            return self.delete(body, ctes)
        if name == "MergeStmt":
            rv = body.get("relation", {})
            target = self.lookup(rv.get("schemaname"), str(rv.get("relname", "")))
            merged = target or first_protected_table(body, self.catalog)
            if merged is not None:
                raise refusals.statement(
                    f"MERGE is not supported on statements involving table {merged.qualified_name}, which has "
                    "encrypted columns",
                    hint="use INSERT ... ON CONFLICT, UPDATE and DELETE",
                )
            return None
        raise refusals.statement(f"a {name} inside this statement cannot be analysed")

    def _result(self, shape: Shape | None) -> WalkResult:
        if shape is None:
            return WalkResult()
        uncertain: list[int] = []
        for i, c in enumerate(shape):
            if isinstance(c, OutColumn) and c.column is not None and not c.certain:
                # A plain column: an EXPRESSION reference (a restricted role is refused), not a result
                # column, since the value may be another relation's.
                self.use_governed((c.column,), "a result column", certain=False, reference=c.name or "")
                uncertain.append(i)
        if shape_is_exact(shape):
            return WalkResult(
                result_columns=tuple(
                    None if i in uncertain else c.column for i, c in enumerate(shape) if isinstance(c, OutColumn)
                )
            )
        for c in shape:
            if c.traced:
                continue
            for col in c.protected if isinstance(c, UnknownColumns) else (c.column,):
                if col is None:
                    continue
                if not col.encrypted:
                    self.refer(col, ReferenceKind.EXPRESSION, "a result column pgveil cannot place (SELECT *)")
                    continue
                raise refusals.statement(
                    f"cannot tell which result column carries encrypted column {col.column_id}: the result also "
                    "has SELECT * over a relation pgveil has no column list for",
                    hint="name the columns in the SELECT list",
                )
        return WalkResult(via_row_description=True)

    def _no_protected_output(self, shape: Shape | None, construct: str) -> None:
        """A result that the server uses itself (DISTINCT, a subquery in an expression, a new table):
        refused for an encrypted column, an EXPRESSION reference for a plain one."""
        self.use_governed(shape_protected(shape or ()), construct)

    # parameters

    def param_target(self, number: int, column: ProtectedColumn) -> None:
        self.params.setdefault(number, []).append(column)

    def param_other(self, number: int) -> None:
        self.params.setdefault(number, []).append(None)

    def param_targets(self) -> dict[int, ProtectedColumn]:
        """``$n`` → column; refuses a parameter that would need to be both encrypted and not, or
        encrypted for two columns (one Bind value cannot be both)."""
        out: dict[int, ProtectedColumn] = {}
        for n, uses in sorted(self.params.items()):
            distinct = set(uses)
            protected = [c for c in distinct if c is not None]
            if not protected:
                continue
            if len(distinct) > 1:
                raise refusals.parameter_reuse(n, list(distinct))
            out[n] = protected[0]
        return out

    # tables

    def lookup(self, schema: str | None, name: str) -> ProtectedTable | None:
        """Catalog.lookup, remembering names that may mean another relation."""
        table = self.catalog.lookup(schema, name)
        if table is not None:
            reason = self.catalog.ambiguity(schema, name)
            if reason is not None:
                self.ambiguous.append(reason)
                if self.catalog.several_protected(schema, name):
                    self.ambiguous_always = True
        return table

    def write_column(self, table: ProtectedTable, name: str) -> ProtectedColumn | None:
        """The protected column an INSERT column list or SET names, if any. A name the catalog does
        not have for a protected relation means the catalog is older than the table (a column added or
        renamed elsewhere): refused until it is read again, never written unsealed."""
        col = table.columns.get(name)
        if table.opaque:
            governed = self.root_columns(table)
            if not any(c.encrypted for c in governed):
                # Plain columns need no sealing: a write through it is a write of each of them.
                for c in governed:
                    self.refer(c, ReferenceKind.WRITE, f"write through opaque relation {table.qualified_name}")
                return None
            raise refusals.statement(
                f"{'view' if table.view else 'table'} {table.schema}.{table.name} reaches table {table.root}, "
                "which has encrypted columns, and pgveil cannot map its columns; it cannot be written through",
                hint="write to the table itself",
            )
        if col is None and table.all_columns and name not in table.all_columns:
            raise CatalogStale(
                f"pgveil: column {name} of {table.qualified_name} is not in pgveil's catalog of encrypted "
                "tables yet; it is being read again",
                hint="retry the statement",
            )
        return col

    def target_table(self, rv: Node, *, reads: bool = True) -> ProtectedTable | None:
        """The table an INSERT/UPDATE/DELETE/COPY writes or reads: always a table, never a CTE. ``reads``:
        the statement reads its rows (UPDATE, DELETE and COPY do; INSERT only through RETURNING)."""
        table = self.lookup(rv.get("schemaname"), str(rv.get("relname", "")))
        if table is not None:
            self.touched = True
            if reads:
                self.read_opaque(table)
        return table

    def target_relation(self, rv: Node, table: ProtectedTable | None) -> Relation:
        alias = rv.get("alias") or {}
        refname = alias.get("aliasname") or str(rv.get("relname", ""))
        shape = table_shape(table) if table is not None else UNKNOWN_SHAPE
        schema = None if alias else (table.schema if table is not None else rv.get("schemaname"))
        return Relation(refname, shape, schema, table)

    # SELECT

    def select(self, body: Node, parent: Level | None, ctes: CteScope, assign: _Assignments | None = None) -> Shape:
        ctes = self.with_clause(body.get("withClause"), parent, ctes)
        level = Level(ctes, parent)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = self.select(body.get("larg", {}), parent, ctes)
            right = self.select(body.get("rarg", {}), parent, ctes)
            shape = self.combine(left, right, str(body["op"]), bool(body.get("all")))
        elif "valuesLists" in body:
            shape = self.values(body["valuesLists"], level, assign)
        else:
            for item in body.get("fromClause", []):
                self.from_item(item, level)
            self.expr(body.get("whereClause"), level, "WHERE")
            hide = body is self._hide_body and assign is None
            shape = self.target_list(body.get("targetList", []), level, "SELECT list", assign, hide=hide)
            for item in body.get("groupClause", []):
                self.group_item(item, level, shape)
            self.expr(body.get("havingClause"), level, "HAVING")
            for w in body.get("windowClause", []):
                self.window(w.get("WindowDef", {}), level)
        distinct = body.get("distinctClause")
        if distinct is not None:
            if distinct == [{}]:
                self._no_protected_output(shape, "DISTINCT")
            else:
                for item in distinct:
                    self.output_ref(item, level, shape, "DISTINCT ON")
        for item in body.get("sortClause", []):
            self.output_ref(item.get("SortBy", {}).get("node", {}), level, shape, "ORDER BY")
        self.expr(body.get("limitOffset"), level, "OFFSET")
        self.expr(body.get("limitCount"), level, "LIMIT")
        return shape

    def combine(self, left: Shape, right: Shape, op: str, all_: bool) -> Shape:
        """The result of a set operation: by position, from both sides."""
        name = {"SETOP_UNION": "UNION", "SETOP_INTERSECT": "INTERSECT", "SETOP_EXCEPT": "EXCEPT"}.get(op, op)
        name += " ALL" if all_ else ""
        protected = shape_protected(left) + shape_protected(right)
        if not protected:
            if shape_is_exact(left) and shape_is_exact(right):
                return tuple(
                    OutColumn(lc.name, null_literal=lc.null_literal and rc.null_literal)
                    for lc, rc in zip(left, right, strict=False)
                    if isinstance(lc, OutColumn) and isinstance(rc, OutColumn)
                )
            if shape_is_exact(left):
                return tuple(OutColumn(c.name) for c in left if isinstance(c, OutColumn))
            return UNKNOWN_SHAPE
        encrypted = [c for c in protected if c.encrypted]
        if not (shape_is_exact(left) and shape_is_exact(right)):
            if encrypted:
                raise refusals.statement(
                    f"cannot tell which column of {name} carries encrypted column {encrypted[0].column_id}: a side "
                    "has SELECT * over a relation pgveil has no column list for",
                    hint="name the columns in each SELECT list",
                )
            for c in protected:
                self.refer(c, ReferenceKind.EXPRESSION, f"{name} with SELECT * over a relation pgveil cannot count")
            return (UnknownColumns(tuple(dict.fromkeys(protected)), traced=False),)
        if name != "UNION ALL":
            # UNION, INTERSECT and EXCEPT compare whole rows, and equal plaintexts have unequal ciphertexts;
            # for a plain column the comparison is a use of its value.
            if encrypted:
                raise refusals.column_use(ColumnUse(encrypted[0], None), name)
            for c in protected:
                self.refer(c, ReferenceKind.EXPRESSION, name)
        out: list[OutColumn | UnknownColumns] = []
        left_columns = [c for c in left if isinstance(c, OutColumn)]
        right_columns = [c for c in right if isinstance(c, OutColumn)]
        for position, (lc, rc) in enumerate(zip(left_columns, right_columns, strict=False), start=1):
            for side in (lc, rc):
                if side.column is not None and not side.certain:
                    self.use_governed((side.column,), name, certain=False, reference=side.name or "")
            both_null = lc.null_literal and rc.null_literal
            if lc.column == rc.column or lc.null_literal or rc.null_literal:
                col = lc.column or rc.column
                out.append(OutColumn(lc.name, col, traced=col is None, null_literal=both_null))
                continue
            col, other = (lc.column, rc.column) if lc.column is not None else (rc.column, lc.column)
            if col is not None and not col.encrypted and (other is None or not other.encrypted):
                # Plain columns: the result column is governed by the first (its grant applies to every
                # row); two different governed columns in one result column are a use of both.
                if other is not None:
                    mixed = f"{name} of different columns in result column {position}"
                    self.refer(col, ReferenceKind.EXPRESSION, mixed)
                    self.refer(other, ReferenceKind.EXPRESSION, mixed)
                out.append(OutColumn(lc.name, col, traced=False))
                continue
            if col is not None and not col.encrypted:
                col, other = other, col
            what = (
                f"{'encrypted' if other.encrypted else 'plain'} column {other.column_id}"
                if other is not None
                else "values that are not encrypted"
            )
            raise refusals.statement(
                f"{name} mixes encrypted column {col.column_id if col else '?'} with {what} in result column "
                f"{position}",
                hint="each result column of a UNION ALL must come from the same encrypted column on every side",
            )
        return tuple(out)

    def values(self, rows: list[Node], level: Level, assign: _Assignments | None) -> Shape:
        width = 0
        subject_at = self._subject_at if assign is not None else None
        for row in rows:
            items = row.get("List", {}).get("items", [])
            width = max(width, len(items))
            if subject_at is not None:
                self._row_subject = self._subject_of(items[subject_at] if subject_at < len(items) else None)
            for position, item in enumerate(items):
                column = assign.at(position) if assign is not None else None
                if column is not None:
                    self.assign_value(item, column, level, ())
                else:
                    self.expr(item, level, "VALUES", "VALUES list")
        return tuple(OutColumn(f"column{i + 1}") for i in range(width))

    def _subject_of(self, node: Node | None) -> SubjectValue | None:
        """The data subject a VALUES item (or a WHERE's ``subject = value``) gives, or None (and why)."""
        table = self._subject_table
        if table is None or table.subject is None:
            return None
        value = classify_value(node) if node is not None else None
        if isinstance(value, Constant):
            return SubjectValue(table.qualified_name, table.subject, literal=value.plaintext)
        if isinstance(value, ParamValue):
            return SubjectValue(table.qualified_name, table.subject, param=value.number)
        self._subject_why = (
            "a NULL subject"
            if isinstance(value, NullValue)
            else "DEFAULT"
            if isinstance(value, DefaultValue)
            else f"a subject given by {describe_value(node, value)}"
            if node is not None and value is not None
            else "a row without the subject column"
        )
        return None

    def target_list(
        self, targets: list[Node], level: Level, clause: str, assign: _Assignments | None, *, hide: bool = False
    ) -> Shape:
        """``hide``: this is the statement's own SELECT list, whose bare encrypted column references may
        be substituted for a role that sees them hidden (see HiddenOutput)."""
        shape: list[OutColumn | UnknownColumns] = []
        for item in targets:
            rt = item.get("ResTarget", {})
            val = rt.get("val", {})
            name = rt.get("name")
            kind, body = node_type(val)
            exact = all(isinstance(c, OutColumn) for c in shape)
            column = None
            if assign is not None:
                if not exact:
                    pending = assign.first_from(len(shape))
                    if pending is not None:
                        raise refusals.insert_select(pending)
                else:
                    column = assign.at(len(shape))
            if kind == "ColumnRef" and column_fields(body)[1]:
                if column is not None:
                    raise refusals.insert_select(column)
                expanded = self.star(body, level)
                if assign is not None and exact:
                    # A * feeds every position it expands to, not only the first one.
                    if all(isinstance(c, OutColumn) for c in expanded):
                        fed = next((t for k in range(len(expanded)) if (t := assign.at(len(shape) + k))), None)
                    else:
                        fed = assign.first_from(len(shape))
                    if fed is not None:
                        raise refusals.insert_select(fed)
                star = "SELECT *" if clause == "SELECT list" else f"{clause.split()[0]} *"
                for col in shape_protected(expanded):
                    self.refer(col, ReferenceKind.OUTPUT, star)
                shape.extend(expanded)
            elif kind == "A_Indirection" and any(node_type(i)[0] == "A_Star" for i in body.get("indirection", [])):
                # (row).* expands to as many columns as the row has: pgveil cannot count them.
                fed = assign.first_from(len(shape)) if assign is not None else None
                if fed is not None:
                    raise refusals.insert_select(fed)
                self.expr(val, level, clause)
                shape.append(UnknownColumns())
            elif column is not None:
                self.assign_value(val, column, level, (), insert_select=True, bare_alias=name is not None)
                shape.append(OutColumn(name))
            elif kind == "ColumnRef":
                fields, _star = column_fields(body)
                use = level.resolve(fields)
                if use is None:
                    shape.append(OutColumn(name or (fields[-1] if fields else None)))
                elif not use.plain:
                    # A whole row (``SELECT t FROM t``) or a field of the column: a value pgveil cannot
                    # attribute column by column.
                    self.use_column(use, clause)
                    shape.append(OutColumn(name or fields[-1]))
                else:
                    self.refer(use.column, ReferenceKind.OUTPUT, clause)
                    shape.append(OutColumn(name or fields[-1], use.column, use.traced, use.certain))
                    if hide and use.column.encrypted and use.certain:
                        self._hidden_output(val, use.column, name, fields[-1])
            else:
                self.expr(val, level, clause)
                is_null = isinstance(classify_value(val), NullValue)
                shape.append(OutColumn(name or figure_name(val), null_literal=is_null))
        return tuple(shape)

    def _hidden_output(self, val: Node, column: ProtectedColumn, alias: str | None, field_name: str) -> None:
        try:
            start, end = self.source.reference_span(val)
        except FeatureNotSupported:
            return  # the text is not where the tree says: the column is fetched and hidden by pgveil
        name = None if alias is not None else field_name
        self.hidden.append(HiddenOutput(start, end, column, name, self.source.sql[start:end]))

    def star(self, body: Node, level: Level) -> Shape:
        """What ``*`` or ``t.*`` expands to."""
        names, _star = column_fields(body)
        if not names:
            return tuple(c for s in level.star for c in s)
        rel = level.find_relation(names[-1], names[-2] if len(names) > 1 else None)
        return rel.shape if rel is not None else UNKNOWN_SHAPE

    def output_ref(self, node: Node, level: Level, shape: Shape, construct: str) -> None:
        """An ORDER BY or DISTINCT ON item: an output column by position or name, else an expression over
        the input (PostgreSQL's findTargetlistEntrySQL92)."""
        kind, body = node_type(node)
        if kind == "A_Const" and "ival" in body:
            self._output_position(int(body["ival"].get("ival", 0)), shape, construct)
            return
        if kind == "ColumnRef":
            fields, star = column_fields(body)
            if len(fields) == 1 and not star:
                for c in shape:
                    if isinstance(c, OutColumn) and c.name == fields[0]:
                        if c.column is not None:
                            self.use_governed((c.column,), construct, certain=c.certain, reference=fields[0])
                        return
        self.expr(node, level, construct, construct)

    def _output_position(self, position: int, shape: Shape, construct: str) -> None:
        for i, c in enumerate(shape, start=1):
            if isinstance(c, UnknownColumns):
                self.use_governed(shape_protected(shape[i - 1 :]), construct)
                return
            if i == position:
                if c.column is not None:
                    self.use_governed((c.column,), construct, certain=c.certain, reference=c.name or "")
                return

    def group_item(self, node: Node, level: Level, shape: Shape) -> None:
        """A GROUP BY item: an input column first, then an output column (findTargetlistEntrySQL92)."""
        kind, body = node_type(node)
        if kind == "GroupingSet":
            for item in body.get("content", []):
                self.group_item(item, level, shape)
            return
        if kind == "A_Const" and "ival" in body:
            self._output_position(int(body["ival"].get("ival", 0)), shape, "GROUP BY")
            return
        if kind == "ColumnRef":
            fields, star = column_fields(body)
            if not star and level.resolve(fields) is None and len(fields) == 1:
                for c in shape:
                    if isinstance(c, OutColumn) and c.name == fields[0] and c.column is not None:
                        self.use_governed((c.column,), "GROUP BY", certain=c.certain, reference=fields[0])
        self.expr(node, level, "GROUP BY", "GROUP BY")

    def window(self, wd: Node, level: Level) -> None:
        for item in wd.get("partitionClause", []):
            self.expr(item, level, "window PARTITION BY", "window PARTITION BY")
        for item in wd.get("orderClause", []):
            self.expr(item.get("SortBy", {}).get("node"), level, "window ORDER BY", "window ORDER BY")
        self.expr(wd.get("startOffset"), level, "window frame")
        self.expr(wd.get("endOffset"), level, "window frame")

    def with_clause(self, with_node: Node | None, parent: Level | None, ctes: CteScope) -> CteScope:
        if not with_node:
            return ctes
        scope = CteScope({}, ctes)
        recursive = bool(with_node.get("recursive"))
        items = [c.get("CommonTableExpr", {}) for c in with_node.get("ctes", [])]
        if recursive:
            for cte in items:
                scope.names[str(cte.get("ctename"))] = CteEntry(None, str(cte.get("ctename")))
        for cte in items:
            name = str(cte.get("ctename"))
            colnames = names_of(cte.get("aliascolnames", []))
            kind, body = node_type(cte.get("ctequery", {}))
            if kind == "SelectStmt" and recursive and body.get("op", "SETOP_NONE") != "SETOP_NONE":
                # The recursive term reads the CTE itself: give it the non-recursive term's columns.
                seed = self.select(body.get("larg", {}), parent, scope)
                renamed = rename(seed, colnames) or UNKNOWN_SHAPE
                scope.names[name] = CteEntry(_untraced(renamed), name)
                shape: Shape | None = self.select(body, parent, scope)
            elif kind == "SelectStmt":
                shape = self.select(body, parent, scope)
            else:
                shape = self.dml_or_select(kind, body, scope)
            shape = shape or ()
            renamed_shape = rename(shape, colnames)
            if renamed_shape is None:
                self._no_protected_output(shape, "a CTE column list over SELECT *")
                renamed_shape = UNKNOWN_SHAPE
            for clause_name, key in (("SEARCH", "search_clause"), ("CYCLE", "cycle_clause")):
                clause = cte.get(key) or {}
                for col_name in names_of(clause.get("search_col_list", []) + clause.get("cycle_col_list", [])):
                    status_col = Relation(name, renamed_shape).lookup(col_name)[1]
                    if status_col is not None and status_col.column is not None:
                        self.use_governed((status_col.column,), f"{clause_name} clause")
            scope.names[name] = CteEntry(renamed_shape, name)
        return scope

    # FROM

    def from_item(self, item: Node, level: Level) -> Shape:
        """Adds a FROM item's relations to ``level``; returns what ``*`` expands to for it."""
        kind, body = node_type(item)
        if kind == "RangeVar":
            return self.range_var(body, level)
        if kind == "RangeSubselect":
            sub_parent = level if body.get("lateral") else level.parent
            shape = self.select(node_type(body.get("subquery", {}))[1], sub_parent, level.ctes)
            return self._add_aliased(level, body.get("alias"), None, shape)
        if kind == "RangeFunction":
            # Functions in FROM may read earlier FROM items whether or not LATERAL is written.
            for f in body.get("functions", []):
                for part in f.get("List", {}).get("items", []):
                    if part:
                        self.expr(part, level, "FROM", None if node_type(part)[0] == "FuncCall" else "FROM function")
            coldefs = [c.get("ColumnDef", {}).get("colname") for c in body.get("coldeflist", [])]
            shape = tuple(OutColumn(str(n)) for n in coldefs) if coldefs else UNKNOWN_SHAPE
            return self._add_aliased(level, body.get("alias"), None, shape)
        if kind == "JoinExpr":
            return self.join(body, level)
        if kind == "RangeTableSample":
            shape = self.from_item(body.get("relation", {}), level)
            self.expr(body.get("args"), level, "FROM", "TABLESAMPLE")
            self.expr(body.get("repeatable"), level, "FROM", "TABLESAMPLE")
            return shape
        self.expr(body, level, "FROM", NODE_CONSTRUCTS.get(kind, f"FROM item ({kind})"))
        return self._add_aliased(level, body.get("alias"), None, UNKNOWN_SHAPE)

    def range_var(self, body: Node, level: Level) -> Shape:
        name = str(body.get("relname", ""))
        schema = body.get("schemaname")
        alias = body.get("alias")
        if schema is None:
            cte = level.ctes.find(name)
            if cte is not None:
                if cte.shape is None:
                    raise refusals.statement(
                        f"WITH RECURSIVE query {name} is referenced before it is defined; pgveil cannot analyse that",
                        hint="define CTEs before the CTEs that use them",
                    )
                return self._add_aliased(level, alias, name, cte.shape)
        table = self.lookup(schema, name)
        if table is None:
            return self._add_aliased(level, alias, name, UNKNOWN_SHAPE, schema=schema)
        self.touched = True
        self.read_opaque(table)
        colnames = names_of((alias or {}).get("colnames", []))
        shape = rename(table_shape(table), colnames)
        if shape is None:
            raise refusals.statement(
                f"column aliases for table {table.qualified_name} need its column list, which pgveil has not read",
                hint="refer to the columns by their names",
            )
        rel = Relation((alias or {}).get("aliasname") or name, shape, None if alias else table.schema, table)
        level.add(rel)
        return shape

    def _add_aliased(
        self, level: Level, alias: Node | None, default_name: str | None, shape: Shape, schema: str | None = None
    ) -> Shape:
        alias = alias or {}
        renamed = rename(shape, names_of(alias.get("colnames", [])))
        if renamed is None:
            self._no_protected_output(shape, "column aliases over SELECT *")
            renamed = UNKNOWN_SHAPE
        level.add(Relation(alias.get("aliasname") or default_name, renamed, None if alias else schema))
        return renamed

    def join(self, body: Node, level: Level) -> Shape:
        rel_mark, star_mark = len(level.relations), len(level.star)
        left = self.from_item(body.get("larg", {}), level)
        right = self.from_item(body.get("rarg", {}), level)
        using = names_of(body.get("usingClause", []))
        if body.get("isNatural"):
            using = self._natural_columns(left, right)
        for name in using:
            for side in (left, right):
                found = Relation(None, side).lookup(name)[1]
                if found is not None and found.column is not None:
                    construct = "NATURAL JOIN" if body.get("isNatural") else "JOIN USING"
                    self.use_governed((found.column,), construct)
        self.expr(body.get("quals"), level, "JOIN ON")
        joined: Shape = (
            tuple(self._merged_column(n, left, right) for n in using)
            + tuple(c for c in left if not (isinstance(c, OutColumn) and c.name in using))
            + tuple(c for c in right if not (isinstance(c, OutColumn) and c.name in using))
        )
        del level.star[star_mark:]
        alias = body.get("alias")
        if alias:
            del level.relations[rel_mark:]
            return self._add_aliased(level, alias, None, joined)
        level.star.append(joined)
        return joined

    @staticmethod
    def _merged_column(name: str, left: Shape, right: Shape) -> OutColumn:
        """A USING or NATURAL join column: the governed column of either side (a plain one; an encrypted
        one was refused), untraced since a FULL JOIN merges it with COALESCE."""
        for side in (left, right):
            found = Relation(None, side).lookup(name)[1]
            if found is not None and found.column is not None:
                return OutColumn(name, found.column, traced=False, certain=found.certain)
        return OutColumn(name)

    def _natural_columns(self, left: Shape, right: Shape) -> list[str]:
        if not (shape_is_exact(left) and shape_is_exact(right)):
            protected = shape_protected(left) + shape_protected(right)
            encrypted = [c for c in protected if c.encrypted]
            if encrypted:
                raise refusals.statement(
                    f"NATURAL JOIN of a table with encrypted column {encrypted[0].column_id} and a relation pgveil "
                    "has no column list for: cannot tell whether it joins on ciphertext",
                    hint="write the join condition with ON or USING",
                )
            for c in protected:
                self.refer(c, ReferenceKind.EXPRESSION, "NATURAL JOIN with a relation pgveil has no column list for")
            return []
        right_names = {c.name for c in right if isinstance(c, OutColumn)}
        return [c.name for c in left if isinstance(c, OutColumn) and c.name is not None and c.name in right_names]

    # INSERT, UPDATE, DELETE

    def insert(self, body: Node, ctes: CteScope) -> Shape | None:
        ctes = self.with_clause(body.get("withClause"), None, ctes)
        rv = body.get("relation", {})
        table = self.target_table(rv, reads=False)
        rel = self.target_relation(rv, table)
        targets: list[ProtectedColumn | None] = []
        cols = [c.get("ResTarget", {}) for c in body.get("cols", [])]
        if table is not None and cols:
            for c in cols:
                col = self.write_column(table, str(c.get("name")))
                if col is not None and col.encrypted and c.get("indirection"):
                    raise refusals.assignment(col, "a subscript or field assignment")
                targets.append(col)
        elif table is not None and (table.columns or table.opaque):
            if table.opaque:
                self.write_column(table, "")
            all_columns = known_columns(table)
            if all_columns is None:
                raise refusals.statement(
                    f"INSERT into {table.qualified_name} without a column list needs the table's column list, "
                    "which pgveil has not read",
                    hint="name the columns in the INSERT",
                )
            targets = [table.columns.get(n) for n in all_columns]
        for col in targets:
            if col is not None:
                self.refer(col, ReferenceKind.WRITE, "INSERT" if cols else "INSERT without a column list")
        # Only encrypted columns need their values sealed; a plain column takes any expression.
        assign = _Assignments(tuple(c if c is not None and c.encrypted else None for c in targets))
        if table is not None and table.subject is not None:
            names = [str(c.get("name")) for c in cols] if cols else list(known_columns(table) or ())
            self._subject_table = table
            self._subject_at = names.index(table.subject.column) if table.subject.column in names else None
            self._subject_why = (
                "INSERT ... SELECT" if self._subject_at is not None else f"{_NOT_NAMED}{table.subject.column}"
            )
            if body.get("override") == "OVERRIDING_USER_VALUE" and table.encrypted:
                raise refusals.overriding_user_value(table.qualified_name, table.subject.column)
        select = body.get("selectStmt")
        if select:
            sbody = node_type(select)[1]
            if sbody.get("op", "SETOP_NONE") != "SETOP_NONE":
                first = assign.first_from(0)
                if first is not None:
                    raise refusals.insert_select(first)
                shape = self.select(sbody, None, ctes)
            else:
                shape = self.select(sbody, None, ctes, assign)
            if (
                table is not None
                and table.encrypted
                and not cols
                and shape_is_exact(shape)
                and len(shape) < len(targets)
            ):
                # Values map to columns by position; with fewer values than the catalog has columns, a
                # column dropped behind pgveil would shift them onto the wrong ones.
                raise refusals.statement(
                    f"INSERT into {table.qualified_name}, which has encrypted columns, without a column list "
                    f"must give a value for each of its {len(targets)} columns",
                    hint="name the columns in the INSERT",
                )
            for position, c in enumerate(shape):
                protected = shape_protected((c,))
                if protected:
                    target = assign.at(position) if isinstance(c, OutColumn) else None
                    if target is not None:
                        raise refusals.insert_select(target)
                    self.use_governed(protected, "INSERT ... SELECT")
        if self._subject_table is not None and select:
            rows = node_type(select)[1].get("valuesLists") or []
            if len(rows) != 1:
                self._row_subject = None  # ON CONFLICT DO UPDATE cannot tell which row it updates
                self._subject_why = "a multi-row INSERT ... ON CONFLICT DO UPDATE"
        conflict = body.get("onConflictClause")
        if conflict:
            self.on_conflict(conflict, table, rel, ctes)
        self._row_subject, self._subject_table, self._subject_at = None, None, None
        level = Level(ctes)
        level.add(rel)
        return self.returning(body, level, rel)

    def on_conflict(self, oc: Node, table: ProtectedTable | None, rel: Relation, ctes: CteScope) -> None:
        level = Level(ctes)
        level.add(rel)
        infer = oc.get("infer") or {}
        for ie in infer.get("indexElems", []):
            elem = ie.get("IndexElem", {})
            col = table.columns.get(str(elem.get("name"))) if table is not None and "name" in elem else None
            if col is not None:
                self.use_column(ColumnUse(col, rel), "ON CONFLICT target")
            self.expr(elem.get("expr"), level, "ON CONFLICT target", "ON CONFLICT target")
        self.expr(infer.get("whereClause"), level, "ON CONFLICT target")
        if oc.get("action") == "ONCONFLICT_UPDATE":
            excluded = Relation("excluded", rel.shape, None, table)
            level.add(excluded, in_star=False)
            if table is not None and table.subject is not None:
                names = {str(ie.get("IndexElem", {}).get("name")) for ie in infer.get("indexElems", [])}
                if table.subject.column not in names:
                    # The existing row may belong to another subject than the inserted one.
                    self._row_subject = None
                    self._subject_why = (
                        f"an ON CONFLICT DO UPDATE whose conflict target does not list {table.subject.column}"
                    )
                    self._subject_table = table
                self._no_subject_change(oc.get("targetList", []), table, "ON CONFLICT DO UPDATE SET")
                self._excluded_subject_check(oc.get("targetList", []), table)
            self.set_list(oc.get("targetList", []), level, table, (rel, excluded), "ON CONFLICT DO UPDATE SET")
            self.expr(oc.get("whereClause"), level, "ON CONFLICT DO UPDATE WHERE")

    def update(self, body: Node, ctes: CteScope) -> Shape | None:
        ctes = self.with_clause(body.get("withClause"), None, ctes)
        rv = body.get("relation", {})
        table = self.target_table(rv)
        rel = self.target_relation(rv, table)
        level = Level(ctes)
        level.add(rel)
        for item in body.get("fromClause", []):
            self.from_item(item, level)
        if table is not None and table.subject is not None:
            self._no_subject_change(body.get("targetList", []), table, "UPDATE")
            self._subject_table = table
            self._subject_why = f"an UPDATE whose WHERE clause does not pin {table.subject.column} = value"
            qualifiers = {
                str(rv.get("relname", "")),
                str((rv.get("alias") or {}).get("aliasname", rv.get("relname", ""))),
            }
            pinned = _pinned(body.get("whereClause"), table.subject.column, qualifiers)
            self._row_subject = self._subject_of(pinned) if pinned is not None else None
        self.set_list(body.get("targetList", []), level, table, (rel,), "UPDATE SET")
        self._row_subject, self._subject_table = None, None
        self.expr(body.get("whereClause"), level, "WHERE")
        return self.returning(body, level, rel)

    def _no_subject_change(self, targets: list[Node], table: ProtectedTable, construct: str) -> None:
        """Changing a row's subject would leave its encrypted values sealed under the old subject's key
        (pgveil does not see them in the statement, so it cannot re-encrypt them): refused."""
        assert table.subject is not None
        if not any(c.encrypted for c in table.columns.values()):
            return
        for item in targets:
            if str(item.get("ResTarget", {}).get("name", "")) == table.subject.column:
                raise refusals.subject_change(table.qualified_name, table.subject.column, construct)

    def _excluded_subject_check(self, targets: list[Node], table: ProtectedTable) -> None:
        """``SET email = EXCLUDED.email`` stores the envelope sealed for the inserted row's subject: only
        right when the existing row has the same subject (the conflict target lists the subject column)."""
        if self._row_subject is not None or table.subject is None:
            return
        for item in targets:
            name = str(item.get("ResTarget", {}).get("name", ""))
            col = table.columns.get(name)
            if col is not None and col.encrypted and col.subject_kind is not None:
                raise refusals.subject_unknown(col, table.qualified_name, table.subject.column, self._subject_why)

    def delete(self, body: Node, ctes: CteScope) -> Shape | None:
        ctes = self.with_clause(body.get("withClause"), None, ctes)
        rv = body.get("relation", {})
        table = self.target_table(rv)
        rel = self.target_relation(rv, table)
        level = Level(ctes)
        level.add(rel)
        for item in body.get("usingClause", []):
            self.from_item(item, level)
        self.expr(body.get("whereClause"), level, "WHERE")
        return self.returning(body, level, rel)

    def returning(self, statement: Node, level: Level, rel: Relation) -> Shape | None:
        # libpg_query 17 and older: ``returningList``; 18: ``returningClause.exprs``.
        exprs = (statement.get("returningClause") or {}).get("exprs") or statement.get("returningList")
        if not exprs:
            return None
        if rel.table is not None:
            self.read_opaque(rel.table)
        # PostgreSQL 18 grammar: RETURNING old.* / new.* name the row before and after the change.
        for name in ("old", "new"):
            if level.find_relation(name) is None:
                level.add(Relation(name, rel.shape, None, rel.table), in_star=False)
        return self.target_list(exprs, level, "RETURNING list", None)

    def set_list(
        self,
        targets: list[Node],
        level: Level,
        table: ProtectedTable | None,
        same: tuple[Relation, ...],
        construct: str,
    ) -> None:
        """UPDATE SET / ON CONFLICT DO UPDATE SET (``construct``). ``same`` are the relations whose own
        column may be assigned back to it unchanged (``SET ssn = ssn``, ``SET ssn = EXCLUDED.ssn``)."""
        for item in targets:
            rt = item.get("ResTarget", {})
            name = str(rt.get("name", ""))
            col = self.write_column(table, name) if table is not None else None
            if col is not None:
                self.refer(col, ReferenceKind.WRITE, construct)
                if not col.encrypted:
                    # A plain column takes any value; what the value reads is a use of its own.
                    use = self._bare_column(rt.get("val", {}), level)
                    if use is not None and use.plain and use.certain and use.column == col and use.relation in same:
                        continue  # SET phone = phone, SET phone = EXCLUDED.phone
                    col = None
            if col is not None and rt.get("indirection"):
                raise refusals.assignment(col, "a subscript or field assignment")
            val = rt.get("val", {})
            kind, body = node_type(val)
            if kind == "MultiAssignRef":
                source_kind, source = node_type(body.get("source", {}))
                colno = int(body.get("colno", 1))
                if source_kind == "RowExpr":
                    args = source.get("args", [])
                    val = args[colno - 1] if colno <= len(args) else {}
                else:
                    self._multiple_assignment(source_kind, source, colno, col, level)
                    continue
            if col is not None:
                self.assign_value(val, col, level, same)
                continue
            use = self._bare_column(val, level)
            if use is not None:
                self.use_column(use, f"assignment to column {name}", "SET")
                continue
            self.expr(val, level, "SET")

    def _multiple_assignment(
        self, kind: str, source: Node, colno: int, col: ProtectedColumn | None, level: Level
    ) -> None:
        """``SET (a, b) = (SELECT ...)``: the subquery runs on the server, so it cannot feed a protected
        column, and a protected column it reads cannot go into another column."""
        if col is not None:
            raise refusals.assignment(col, "a subquery")
        if kind != "SubLink":
            self.expr({kind: source}, level, "SET")
            return
        key = int(source.get("location", -1))
        shape = self._multiexpr.get(key)
        if shape is None:
            shape = self.select(node_type(source.get("subselect", {}))[1], level, level.ctes)
            self._multiexpr[key] = shape
        if colno - 1 < len(shape):
            self._no_protected_output(shape[colno - 1 : colno], "SET (...) = (subquery)")

    def assign_value(
        self,
        node: Node,
        column: ProtectedColumn,
        level: Level,
        same: tuple[Relation, ...],
        *,
        insert_select: bool = False,
        bare_alias: bool = False,
    ) -> None:
        """A value written into a protected column: record what the session must encrypt or rewrite."""
        value = classify_value(node)
        subject: SubjectValue | None = None
        if column.subject_kind is not None and isinstance(value, Constant | ParamValue):
            subject = self._row_subject
            if subject is None:
                owner = self._subject_table
                if owner is None or owner.subject is None:
                    # A view, a MERGE, a statement whose rows pgveil cannot follow to their subject.
                    table_name = column.column_id.rsplit(".", 1)[0]
                    raise refusals.subject_unknown(column, table_name, "its subject column", "this statement")
                raise refusals.subject_unknown(
                    column,
                    owner.qualified_name,
                    owner.subject.column,
                    self._subject_why,
                    generatable=self._subject_why in _GENERATABLE or self._subject_why.startswith(_NOT_NAMED),
                )
        if isinstance(value, Constant):
            start, end = self.source.value_span(node, bare_alias=bare_alias)
            self.literals.append(
                LiteralTarget(start, end, value.plaintext, column, value.cast_type, value.numeric, subject)
            )
        elif isinstance(value, NullValue):
            if value.cast:
                start, end = self.source.value_span(node, bare_alias=bare_alias)
                self.edits.append(TextEdit(start, end, "NULL"))
        elif isinstance(value, ParamValue):
            self.param_target(value.number, column)
            if subject is not None and self.param_subjects.setdefault(value.number, subject) != subject:
                raise refusals.statement(
                    f"parameter ${value.number} is written into encrypted column {column.column_id} for two "
                    "rows of different data subjects",
                    hint="pass the value as a separate parameter for each row",
                )
            if value.cast:
                start, end = self.source.value_span(node, bare_alias=bare_alias)
                self.edits.append(TextEdit(start, end, f"${value.number}"))
        elif isinstance(value, DefaultValue):
            pass
        else:
            use = self._bare_column(node, level)
            if use is not None and use.plain and use.certain and use.column == column and use.relation in same:
                return
            if insert_select:
                raise refusals.insert_select(column)
            raise refusals.assignment(column, describe_value(node, value))

    # COPY

    def copy(self, body: Node) -> WalkResult:
        direction = CopyDirection.FROM if body.get("is_from") else CopyDirection.TO
        with_client = "filename" not in body and not body.get("is_program")
        fmt, options = parse_copy_options(body.get("options", []))
        if "relation" in body:
            rv = body["relation"]
            table = self.target_table(rv)
            if table is None:
                return WalkResult()
            names = names_of(body.get("attlist", []))
            all_columns = known_columns(table)
            if not names:
                if all_columns is None:
                    raise refusals.statement(
                        f"COPY {table.qualified_name} without a column list needs the table's column list, "
                        "which pgveil has not read",
                        hint="name the columns in the COPY",
                    )
                names = list(all_columns)
            if direction is CopyDirection.FROM:
                governed = tuple(self.write_column(table, n) for n in names)
            else:
                governed = tuple(table.columns.get(n) for n in names)
            use = ReferenceKind.WRITE if direction is CopyDirection.FROM else ReferenceKind.OUTPUT
            for col in governed:
                if col is not None:
                    self.refer(col, use, f"COPY {direction.value.upper()}")
            protected = _encrypted(governed)
            subject_index = -1
            if (
                direction is CopyDirection.FROM
                and table.subject is not None
                and any(c is not None and c.subject_kind is not None for c in protected)
            ):
                if table.subject.column not in names:
                    first = next(c for c in protected if c is not None and c.subject_kind is not None)
                    raise refusals.subject_unknown(
                        first, table.qualified_name, table.subject.column, "a COPY whose column list does not name it"
                    )
                subject_index = names.index(table.subject.column)
            self._copy_binary(fmt, protected)
            if not with_client:
                self._copy_with_server_file(direction, governed)
            where = body.get("whereClause")
            if where:
                level = Level(CteScope())
                level.add(self.target_relation(rv, table))
                self.expr(where, level, "COPY ... WHERE")
            plan = CopyPlan(table, direction, tuple(names), protected, fmt, options, subject_index=subject_index)
            return WalkResult(copy=_with_governed(plan, governed))
        kind, query = node_type(body.get("query", {}))
        shape = self.dml_or_select(kind, query, CteScope()) or ()
        result = self._result(shape)
        if not with_client:
            self._copy_with_server_file(direction, tuple(shape_protected(shape)))
        self._copy_binary(fmt, _encrypted(tuple(shape_protected(shape))))
        if result.result_columns is None:
            columns = shape_protected(shape)
            encrypted = [c for c in columns if c.encrypted]
            if encrypted:
                raise refusals.statement(
                    "COPY (query) TO STDOUT with SELECT * over a relation pgveil has no column list for cannot "
                    f"tell where encrypted column {encrypted[0].column_id} is",
                    hint="name the columns in the query",
                )
            unplaced = "COPY (query) with SELECT * over a relation pgveil cannot count"
            for col in columns:
                self.refer(col, ReferenceKind.EXPRESSION, unplaced)
            return WalkResult(copy=CopyPlan(None, direction, (), (), fmt, options))
        plan = CopyPlan(None, direction, (), _encrypted(result.result_columns), fmt, options)
        return WalkResult(result_columns=result.result_columns, copy=_with_governed(plan, result.result_columns))

    @staticmethod
    def _copy_binary(fmt: CopyFormat, protected: tuple[ProtectedColumn | None, ...]) -> None:
        column = next((c for c in protected if c is not None), None)
        if fmt is CopyFormat.BINARY and column is not None:
            raise refusals.statement(
                f"COPY in binary format is not supported for encrypted column {column.column_id}",
                hint="use FORMAT text or FORMAT csv",
            )

    def _copy_with_server_file(self, direction: CopyDirection, governed: tuple[ProtectedColumn | None, ...]) -> None:
        """COPY to or from a server file or program: the server reads or writes the values itself,
        bypassing pgveil. Refused for an encrypted column; a use (EXPRESSION) of a plain one."""
        for column in governed:
            if column is None:
                continue
            if not column.encrypted:
                self.refer(column, ReferenceKind.EXPRESSION, f"COPY {direction.value.upper()} a server file or program")
                continue
            effect = "read plaintext into it" if direction is CopyDirection.FROM else "write its ciphertext"
            raise refusals.statement(
                f"COPY {direction.value.upper()} a server file or program is not supported for encrypted column "
                f"{column.column_id}: the server would {effect} directly, bypassing pgveil",
                hint="use COPY ... FROM STDIN / TO STDOUT (psql's \\copy)",
            )

    # expressions

    def _bare_column(self, node: Node | None, level: Level) -> ColumnUse | None:
        if not node:
            return None
        kind, body = node_type(node)
        if kind != "ColumnRef":
            return None
        fields, star = column_fields(body)
        if star:
            return None
        return level.resolve(fields)

    def expr(self, node: Any, level: Level, clause: str, construct: str | None = None) -> None:
        """Checks an expression: any protected column in it is refused, named with the innermost construct
        around it (``construct`` if it stands directly here, else ``clause``)."""
        if not node:
            return
        if isinstance(node, list):
            for item in node:
                self.expr(item, level, clause, construct)
            return
        kind, body = node_type(node)
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, body, level, clause, construct)
            return
        if kind[:1].isupper() and isinstance(body, dict):
            self._children(body, level, clause, NODE_CONSTRUCTS.get(kind, construct or f"expression ({kind})"))
        else:
            self._children(node, level, clause, construct)

    def _children(self, value: Any, level: Level, clause: str, construct: str | None) -> None:
        """Walks the nodes below an unwrapped struct (a field typed as a specific node has no wrapper)."""
        items = value.values() if isinstance(value, dict) else value
        for v in items:
            if is_wrapped(v):
                self.expr(v, level, clause, construct)
            elif isinstance(v, dict | list):
                self._children(v, level, clause, construct)

    def _column_ref(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        fields, star = column_fields(body)
        if star:
            # ``t.*`` inside an expression (a row constructor, a function taking the row).
            protected = list(dict.fromkeys(shape_protected(self.star(body, level))))
            encrypted = next((c for c in protected if c.encrypted), None)
            if encrypted is not None:
                raise refusals.column_use(ColumnUse(encrypted, None), construct or clause, clause)
            label = f"whole-row reference (in {refusals.where(construct or clause, clause)})"
            for c in protected:
                self.refer(c, ReferenceKind.EXPRESSION, label)
            return
        use = level.resolve(fields)
        if use is not None:
            self.use_column(use, construct or clause, clause)

    def _param_ref(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        self.param_other(int(body.get("number", 0)))

    def _a_expr(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        op = last_name(body.get("name", []))
        label, equality = operator_construct(str(body.get("kind")), op, "lexpr" in body)
        operands: list[Any] = [body.get("lexpr")]
        rexpr = body.get("rexpr")
        if isinstance(rexpr, dict) and "List" in rexpr:
            operands.extend(rexpr["List"].get("items", []))
        else:
            operands.append(rexpr)
        for operand in operands:
            if equality:
                use = self._bare_column(operand, level)
                if use is not None:
                    self._equality(use, label, clause)
                    continue
            self.expr(operand, level, clause, label)

    def _equality(self, use: ColumnUse, construct: str, clause: str) -> None:
        """Equality (``=``, ``IN``, ``= ANY``) on a governed column.

        This is where searchable columns will be rewritten to their blind index: the column reference
        becomes the index column and the other operand (a literal or ``$n``) a blind-index target, as
        literals and parameters are encryption targets today. No encrypted column is searchable yet; a
        plain column's equality is an EQUALITY reference (the role's grant decides).
        """
        if use.column.encrypted or not use.plain:
            if use.column.encrypted:
                raise refusals.not_searchable(use, construct, clause)
            self.use_column(use, construct, clause)
            return
        self.refer(use.column, ReferenceKind.EQUALITY, refusals.where(construct, clause))

    def _bool_expr(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        label = "NOT" if body.get("boolop") == "NOT_EXPR" else "boolean condition"
        self.expr(body.get("args"), level, clause, label)

    def _null_test(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        arg = body.get("arg", {})
        test = "IS NOT NULL" if body.get("nulltesttype") == "IS_NOT_NULL" else "IS NULL"
        if node_type(arg)[0] == "ColumnRef":
            # Nullness is not encrypted (a row's, ``t.* IS NULL``, neither): a reference, never a refusal.
            self.note_nullness(arg, level, refusals.where(test, clause))
            return
        self.expr(arg, level, clause, test)

    def _boolean_test(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        test = str(body.get("booltesttype", "")).replace("_", " ")
        self.expr(body.get("arg"), level, clause, test)

    def _type_cast(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        self.expr(body.get("arg"), level, clause, f"cast to {type_name_text(body.get('typeName', {}))}")

    def _func_call(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        name = last_name(body.get("funcname", []))
        args = body.get("args", [])
        over = body.get("over")
        if over:
            label = f"window function {name}()"
            self.window(over, level)
        elif body.get("agg_distinct"):
            label = f"{name}(DISTINCT ...)"
        elif name == "count" and len(args) == 1 and not body.get("agg_order") and not body.get("agg_within_group"):
            label = "aggregate count()"
            if node_type(args[0])[0] == "ColumnRef":
                # count(col) counts non-null values: nullness is not encrypted; a reference, never a refusal.
                self.note_nullness(args[0], level, refusals.where(label, clause))
                args = []
        elif name in AGGREGATES:
            label = f"aggregate {name}()"
        else:
            label = f"function {name}()"
        refs = sql_text_references(body, self.catalog)
        if refs:
            self.touched = True
            for ref in refs:
                self.refer(ref.column, ref.kind, ref.construct)
        self.expr(args, level, clause, label)
        for item in body.get("agg_order", []):
            self.expr(item.get("SortBy", {}).get("node"), level, clause, f"ORDER BY in aggregate {name}()")
        self.expr(body.get("agg_filter"), level, "FILTER")

    def _sub_link(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        link = body.get("subLinkType")
        shape = self.select(node_type(body.get("subselect", {}))[1], level, level.ctes)
        if link == "EXISTS_SUBLINK":
            return
        op = last_name(body.get("operName", [])) or "="
        equality = False
        if link == "ANY_SUBLINK":
            label, equality = ("IN (subquery)", True) if op == "=" else (f"{op} ANY (subquery)", False)
        elif link == "ALL_SUBLINK":
            label = f"{op} ALL (subquery)"
        elif link == "ARRAY_SUBLINK":
            label = "ARRAY(subquery)"
        elif link == "EXPR_SUBLINK":
            label = "scalar subquery"
        else:
            label = "comparison with subquery"
        test = body.get("testexpr")
        use = self._bare_column(test, level) if equality else None
        if use is not None:
            self._equality(use, label, clause)
        else:
            self.expr(test, level, clause, label)
        for c in shape:
            if isinstance(c, OutColumn) and c.column is not None:
                self.use_governed((c.column,), label, clause, certain=c.certain, reference=c.name or "")
        self.use_governed([c for u in shape if isinstance(u, UnknownColumns) for c in u.protected], label)

    def _nested_select(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        self._no_protected_output(self.select(body, level, level.ctes), construct or clause)

    def _range_var(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        table = self.lookup(body.get("schemaname"), str(body.get("relname", "")))
        if table is not None:
            columns = self.root_columns(table) if table.opaque else list(table.columns.values())
            if any(c.encrypted for c in columns):
                raise refusals.statement(
                    f"table {table.qualified_name}, which has encrypted columns, cannot be used in "
                    f"{construct or clause}"
                )
            self.touched = True
            for c in columns:
                self.refer(c, ReferenceKind.EXPRESSION, f"table {table.qualified_name} in {construct or clause}")

    def _min_max(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        label = "GREATEST" if body.get("op") == "IS_GREATEST" else "LEAST"
        self.expr(body.get("args"), level, clause, label)

    def _list(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        self.expr(body.get("items"), level, clause, construct)

    def _noop(self, body: Node, level: Level, clause: str, construct: str | None) -> None:
        return


def sql_text_references(call: Node, catalog: Catalog) -> list[Reference]:
    """A call of a function that runs SQL given as a string or dumps a table, cursor, schema or database by
    name (``query_to_xml``, ``table_to_xml``, ``dblink``, ...; see SQL_TEXT_FUNCTIONS), whatever its schema:
    an EXPRESSION reference to every plain governed column of every governed table whose name occurs in
    its string arguments, or of every governed table if the function does not name what it reads or an
    argument is not a constant (a parameter or an expression may spell any SQL). Encrypted columns are
    left out: the server holds only their envelopes, which is all such a function can return."""
    name = last_name(call.get("funcname", [])).lower()
    if name not in SQL_TEXT_FUNCTIONS:
        return []
    args = call.get("args", [])
    if name in WHOLE_DATABASE_FUNCTIONS or not all(is_constant(a) for a in args):
        tables = list(catalog.tables.values())
    else:
        tables = tables_named_in_strings(args, catalog)
    construct = f"{name}()"
    columns: dict[ProtectedColumn, None] = {}
    for table in tables:
        for col in (*table.columns.values(), *catalog.root_of(table).columns.values()):
            if not col.encrypted:
                columns[col] = None
    return [Reference(c, ReferenceKind.EXPRESSION, construct) for c in columns]


def statement_sql_text_references(stmt: Node, catalog: Catalog) -> list[Reference]:
    """:func:`sql_text_references` of every such call anywhere in ``stmt`` (also where the walker does not
    look at expressions), and :func:`statistics_references`."""
    out: dict[Reference, None] = {}
    for call in function_calls(stmt, SQL_TEXT_FUNCTIONS):
        out.update(dict.fromkeys(sql_text_references(call, catalog)))
    out.update(dict.fromkeys(statistics_references(stmt, catalog)))
    return list(out)


# The planner's statistics, as PostgreSQL shows them to a role with SELECT on the column: sampled values
# (most_common_vals, histogram_bounds, the extended statistics' expressions and their values).
STATISTICS_RELATIONS = frozenset(
    {"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data"}
)


def statistics_references(stmt: Node, catalog: Catalog) -> list[Reference]:
    """A statement that reads one of STATISTICS_RELATIONS (in any schema) reads values ANALYZE sampled
    from every column it has statistics for: an EXPRESSION reference to every plain governed column
    (encrypted ones have only envelopes there)."""
    named = [n for n in relation_names(stmt) if n.lower() in STATISTICS_RELATIONS]
    if not named:
        return []
    return plain_governed_references(catalog, f"the planner statistics view {named[0].lower()}")


def plain_governed_references(catalog: Catalog, construct: str) -> list[Reference]:
    """An EXPRESSION reference to every plain governed column of the catalog: what a construct makes that
    may read any table without naming it (encrypted columns hold only envelopes there)."""
    return [
        Reference(col, ReferenceKind.EXPRESSION, construct)
        for table in catalog.tables.values()
        for col in table.columns.values()
        if not col.encrypted
    ]


def _pinned(where: Node | None, column: str, qualifiers: set[str]) -> Node | None:
    """The value a WHERE clause pins ``column`` (of the relation named by one of ``qualifiers``, or
    unqualified) to with a top-level ``column = value`` conjunct (either side; AND-ed with anything), or
    None. Every row the statement touches then has that value."""
    if not where:
        return None
    kind, body = node_type(where)
    if kind == "BoolExpr" and body.get("boolop") == "AND_EXPR":
        for arg in body.get("args", []):
            found = _pinned(arg, column, qualifiers)
            if found is not None:
                return found
        return None
    if kind != "A_Expr" or body.get("kind") != "AEXPR_OP":
        return None
    ops = [node_type(n)[1].get("sval") for n in body.get("name", [])]
    if ops != ["="]:
        return None
    left: Node = body.get("lexpr", {})
    right: Node = body.get("rexpr", {})
    for a, b in ((left, right), (right, left)):
        k, ref = node_type(a)
        if k == "ColumnRef":
            fields = [node_type(f)[1].get("sval") for f in ref.get("fields", [])]
            qualified_ok = len(fields) == 1 or (len(fields) == 2 and fields[0] in qualifiers)
            if (
                fields
                and fields[-1] == column
                and qualified_ok
                and isinstance(classify_value(b), Constant | ParamValue)
            ):
                return b
    return None


def _encrypted(columns: tuple[ProtectedColumn | None, ...]) -> tuple[ProtectedColumn | None, ...]:
    """The encrypted columns of a per-column mask; plain governed columns become None."""
    return tuple(c if c is not None and c.encrypted else None for c in columns)


def _with_governed(plan: CopyPlan, governed: tuple[ProtectedColumn | None, ...]) -> CopyPlan:
    return plan if governed == plan.protected else dataclasses.replace(plan, governed=governed)


def _untraced(shape: Shape) -> Shape:
    return tuple(
        OutColumn(c.name, c.column, False, c.certain)
        if isinstance(c, OutColumn)
        else UnknownColumns(c.protected, False)
        for c in shape
    )


_Handler = Callable[[StatementWalker, Node, Level, str, "str | None"], None]

_HANDLERS: dict[str, _Handler] = {
    "List": StatementWalker._list,
    "ColumnRef": StatementWalker._column_ref,
    "ParamRef": StatementWalker._param_ref,
    "A_Expr": StatementWalker._a_expr,
    "BoolExpr": StatementWalker._bool_expr,
    "NullTest": StatementWalker._null_test,
    "BooleanTest": StatementWalker._boolean_test,
    "TypeCast": StatementWalker._type_cast,
    "FuncCall": StatementWalker._func_call,
    "SubLink": StatementWalker._sub_link,
    "SelectStmt": StatementWalker._nested_select,
    "RangeVar": StatementWalker._range_var,
    "MinMaxExpr": StatementWalker._min_max,
    "A_Const": StatementWalker._noop,
    "SetToDefault": StatementWalker._noop,
    "SQLValueFunction": StatementWalker._noop,
    "CurrentOfExpr": StatementWalker._noop,
    "String": StatementWalker._noop,
    "A_Star": StatementWalker._noop,
    "TypeName": StatementWalker._noop,
}
