"""Generated subject ids, the pure part: for an INSERT into a table with per-subject keys that leaves the
subject column to the database (no column in the list, or ``DEFAULT`` in a row), say how many ids the
database must generate first (:func:`plan_generated_subjects`), the query that makes them on the server
(:func:`default_values_query`), and the INSERT with the ids supplied as literals (:func:`supply_subjects`),
so that the statement the walker then sees names every row's subject and RETURNING shows the same ids.

Sans-I/O: no connection, no keys. Everything pgveil cannot be certain about is refused with ``0A000``
naming the table, the subject column and the construct (``INSERT … SELECT``, whose row count is not known
before it runs; a ``DEFAULT`` whose expression reads a column; a generated ``AS (…) STORED`` column; a
statement of several commands). Never a value in a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pglast import ast, parse_sql
from pglast.enums.primnodes import OverridingKind
from pglast.stream import RawStream

from proxy.errors import FeatureNotSupported


@dataclass(frozen=True, slots=True)
class ColumnDefault:
    """What the catalog says of a subject column's value when an INSERT leaves it out."""

    expression: str | None  # pg_get_expr of pg_attrdef, or for identity the nextval of its sequence
    identity: str = ""  # pg_attribute.attidentity: '' none, 'a' ALWAYS, 'd' BY DEFAULT
    generated: str = ""  # pg_attribute.attgenerated: '' none, 's' STORED
    before_insert_trigger: bool = False  # a BEFORE INSERT row trigger could change the id after pgveil chose
    # a BEFORE INSERT or UPDATE row trigger (on the table or a descendant, enabled or not) could change a
    # client-given id after pgveil sealed the row's values for it
    before_write_trigger: bool = False


@dataclass(frozen=True, slots=True)
class GeneratedPlan:
    """``rows`` ids to generate, one per VALUES row that leaves the subject to the database (``slots``: the
    indexes of those rows)."""

    rows: int
    slots: tuple[int, ...]


def _refuse(table: str, column: str, construct: str) -> FeatureNotSupported:
    return FeatureNotSupported(
        f"pgveil: cannot generate the subject id for column {column} of table {table}: {construct}",
        hint=f"supply {column} as a literal or a $n parameter",
    )


def _single_insert(sql: str, table: str, column: str) -> ast.InsertStmt:
    stmts = parse_sql(sql)
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.InsertStmt):
        raise _refuse(table, column, "the statement is not a single INSERT")
    stmt = stmts[0].stmt
    assert isinstance(stmt, ast.InsertStmt)
    return stmt


def _position(stmt: ast.InsertStmt, column: str) -> int | None:
    for index, target in enumerate(stmt.cols or ()):
        if isinstance(target, ast.ResTarget) and target.name == column:
            return index
    return None


def plan_generated_subjects(sql: str, table: str, column: str, default: ColumnDefault) -> GeneratedPlan | None:
    """None when every row of the INSERT gives its subject itself (nothing to generate); otherwise the plan.
    Refuses (0A000) what pgveil cannot supply safely."""
    stmt = _single_insert(sql, table, column)
    at = _position(stmt, column)
    select = stmt.selectStmt
    if select is None:  # INSERT … DEFAULT VALUES
        if at is not None:
            return None
        values: tuple[tuple[object, ...], ...] = ((),)
    elif isinstance(select, ast.SelectStmt) and select.valuesLists:
        if not stmt.cols:
            # The values are the table's columns in order: which one is the subject is the catalog's.
            raise _refuse(table, column, "the INSERT has no column list")
        values = tuple(tuple(row) for row in select.valuesLists)
    else:
        if at is not None:
            return None
        raise _refuse(table, column, "INSERT … SELECT leaves it to the database and its row count is not known first")
    if at is None:
        slots = tuple(range(len(values)))
    else:
        slots = tuple(i for i, row in enumerate(values) if isinstance(row[at], ast.SetToDefault))
    if not slots:
        return None
    check_column_default(default, table, column)
    return GeneratedPlan(len(slots), slots)


def check_column_default(default: ColumnDefault, table: str, column: str) -> None:
    """Refuses (0A000) a subject column whose value pgveil cannot generate safely: a BEFORE INSERT trigger
    on the table, a generated column, no default, a default that reads a column or a subquery."""
    if default.before_insert_trigger:
        raise _refuse(table, column, "the table has a BEFORE INSERT trigger that could change it")
    if default.generated:
        raise _refuse(table, column, "it is a generated column (GENERATED ALWAYS AS … STORED)")
    if default.expression is None:
        raise _refuse(table, column, "the column has no default, so the database would store NULL")
    _check_default(default.expression, table, column)


def _check_default(expression: str, table: str, column: str) -> None:
    stmts = parse_sql(f"SELECT ({expression})")
    seen: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, ast.ColumnRef):
            seen.append("column")
        elif isinstance(node, (ast.SubLink, ast.RangeSubselect)):
            seen.append("subquery")
        if isinstance(node, ast.Node):
            for name in node:
                visit(getattr(node, name))
        elif isinstance(node, tuple | list):
            for item in node:
                visit(item)

    visit(stmts[0].stmt)
    if seen:
        raise _refuse(table, column, f"its default reads a {seen[0]}")


def default_values_query(expression: str, rows: int) -> str:
    """The query that evaluates the default once per row on the server, in the order of the rows."""
    if rows < 1:
        raise ValueError("rows must be positive")
    # The expression is the catalog's own pg_get_expr text (checked by _check_default), not client input.
    return f"SELECT ({expression})::text FROM generate_series(1, {int(rows)}) AS g(n) ORDER BY g.n"  # noqa: S608


def _literal(value: str) -> ast.A_Const:
    return ast.A_Const(val=ast.String(sval=value))


def highest_parameter(sql: str) -> int:
    """The highest ``$n`` the statement refers to (0 for none)."""
    highest = 0

    def visit(node: object) -> None:
        nonlocal highest
        if isinstance(node, ast.ParamRef):
            highest = max(highest, node.number or 0)
        if isinstance(node, ast.Node):
            for name in node:
                visit(getattr(node, name))
        elif isinstance(node, tuple | list):
            for item in node:
                visit(item)

    for raw in parse_sql(sql):
        visit(raw.stmt)
    return highest


def supply_subjects(sql: str, table: str, column: str, plan: GeneratedPlan, ids: list[str], identity: str) -> str:
    """The INSERT with each planned row's generated id written as a literal in the subject column (added
    to the column list when absent), with ``OVERRIDING SYSTEM VALUE`` for a GENERATED ALWAYS identity."""
    if len(ids) != plan.rows:
        raise _refuse(table, column, "the database gave a different number of ids than rows")
    return _supply(sql, table, column, plan, [_literal(i) for i in ids], identity)


def supply_subject_parameters(sql: str, table: str, column: str, plan: GeneratedPlan, first: int, identity: str) -> str:
    """A prepared INSERT with each planned row's subject given by a parameter of its own, ``$first`` to
    ``$(first + rows - 1)`` in row order, whose values pgveil binds at each execution."""
    if first < 1:
        raise ValueError("parameters are numbered from 1")
    params = [ast.ParamRef(number=first + i) for i in range(plan.rows)]
    return _supply(sql, table, column, plan, params, identity)


def _supply(sql: str, table: str, column: str, plan: GeneratedPlan, values: Sequence[ast.Node], identity: str) -> str:
    stmt = _single_insert(sql, table, column)
    at = _position(stmt, column)
    select = stmt.selectStmt
    generated = dict(zip(plan.slots, values, strict=True))
    if select is None:
        stmt.cols = (ast.ResTarget(name=column),)
        stmt.selectStmt = ast.SelectStmt(valuesLists=((values[0],),), limitOption=0, op=0)
    else:
        assert isinstance(select, ast.SelectStmt)
        assert select.valuesLists
        rows: list[tuple[object, ...]] = []
        for index, row in enumerate(select.valuesLists):
            items = list(row)
            if at is None:
                items.append(generated[index])
            elif index in generated:
                items[at] = generated[index]
            rows.append(tuple(items))
        select.valuesLists = tuple(rows)
        if at is None:
            stmt.cols = (*(stmt.cols or ()), ast.ResTarget(name=column))
    if identity == "a":
        stmt.override = OverridingKind.OVERRIDING_SYSTEM_VALUE
    return RawStream()(stmt)
