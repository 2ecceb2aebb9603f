"""``pgveil schema apply``: makes the database ready to hold ciphertext in the protected columns.

For every protected column the plan ensures three things: the column exists, it is ``bytea``, and a CHECK
constraint ``pgveil_envelope_<column>`` lets PostgreSQL itself refuse anything that is not a pgveil
envelope, so a write that bypasses the proxy fails loudly instead of storing plaintext.

``plan_schema`` only reads (the catalog, and whether a column holds values); each ``SchemaStep`` is
printable for a dry run. ``apply_schema`` runs the steps in one transaction, after locking the tables
and re-checking each step's guard, so data written between plan and apply is never destroyed.
Planning is idempotent: on a ready database it returns no steps.

This module never converts existing plaintext (``pgveil encrypt`` does, see
:mod:`keymgmt.column_migration`); it refuses, naming the column. Messages
never contain values from the tables.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

import asyncpg

from keymgmt import envelope
from proxy.catalog_loader import TABLE_RELKINDS, CatalogConnection, ColumnInfo, read_tables
from proxy.errors import ProxyError
from proxy.rewrite.catalog import Catalog, ProtectedColumn

log = logging.getLogger(__name__)

# The constraint admits exactly envelope v1 (keymgmt.envelope documents the layout): the magic, version
# and algorithm bytes, and at least the 48 bytes of header and tag around an empty plaintext. A future
# envelope version needs a new constraint, which is the point: nothing unrecognised gets in.
ENVELOPE_PREFIX: Final = envelope.MAGIC + bytes((envelope.VERSION_1, envelope.ALGORITHM_AES256GCM))
ENVELOPE_MIN_LENGTH: Final = envelope.MIN_LENGTH
CONSTRAINT_PREFIX: Final = "pgveil_envelope_"
_MAX_IDENTIFIER_LENGTH: Final = 63


class SchemaRefused(ProxyError):
    """The database cannot be made ready without losing or rewriting data; ``reasons`` says why."""

    sqlstate = "55000"  # object_not_in_prerequisite_state

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("schema apply refused: " + "; ".join(reasons))
        self.reasons = reasons


class StepKind(StrEnum):
    ADD_COLUMN = "add column"
    ALTER_TYPE = "alter type"
    ADD_CONSTRAINT = "add constraint"
    VALIDATE_CONSTRAINT = "validate constraint"
    EVENT_TRIGGER = "event trigger"


@dataclass(frozen=True, slots=True)
class SchemaStep:
    """One DDL statement. ``guard``, when set, is a query that must return true, under the table's lock,
    right before ``sql`` runs."""

    kind: StepKind
    schema: str
    table: str
    column: str
    sql: str
    description: str
    guard: str | None = None


class SchemaConnection(CatalogConnection, Protocol):
    """The part of ``asyncpg.Connection`` this module uses."""

    async def fetchval(self, query: str, *args: Any) -> Any: ...

    async def execute(self, query: str, *args: Any) -> str: ...

    def transaction(self) -> AbstractAsyncContextManager[Any]: ...


# ---------------------------------------------------------------------------------------------------
# SQL text (pure)
# ---------------------------------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def constraint_name(column: str) -> str:
    """``pgveil_envelope_<column>``, shortened with a hash when PostgreSQL would truncate it: a truncated
    name could collide with another column's, and would never match on the next plan."""
    name = CONSTRAINT_PREFIX + column
    if len(name.encode()) <= _MAX_IDENTIFIER_LENGTH:
        return name
    digest = hashlib.sha256(column.encode()).hexdigest()[:8]
    room = _MAX_IDENTIFIER_LENGTH - len(CONSTRAINT_PREFIX) - 1 - len(digest)
    return f"{CONSTRAINT_PREFIX}{column.encode()[:room].decode(errors='ignore')}_{digest}"


def envelope_check(column: str) -> str:
    """The boolean expression a value of ``column`` must satisfy (NULL passes, as it passes any CHECK).

    It is kept to two built-in calls and two constants: PostgreSQL 15 reads a table's CHECK expressions
    back from the catalog and plans them again for every execution of an INSERT or UPDATE, so each node
    costs every write (the earlier ``c IS NULL OR (... = decode('..', 'hex'))`` cost the server about 5 µs
    per column per row, this one about 3.5). The escape-string literal means the same whatever
    ``standard_conforming_strings`` says, and is stored as a bytea constant; ``substring`` never fails on
    a short value, so the expression is safe whatever order PostgreSQL evaluates the AND in."""
    c = quote_ident(column)
    return (
        f"octet_length({c}) >= {ENVELOPE_MIN_LENGTH}"
        f" AND substring({c} from 1 for {len(ENVELOPE_PREFIX)}) = E'\\\\x{ENVELOPE_PREFIX.hex()}'::bytea"
    )


def _add_column(col: ProtectedColumn) -> SchemaStep:
    return SchemaStep(
        kind=StepKind.ADD_COLUMN,
        schema=col.schema,
        table=col.table,
        column=col.name,
        sql=f"ALTER TABLE {qualified(col.schema, col.table)} ADD COLUMN {quote_ident(col.name)} bytea",
        description=f"add column {col.column_id} as bytea",
    )


def _alter_type(col: ProtectedColumn, current_type: str) -> SchemaStep:
    table, c = qualified(col.schema, col.table), quote_ident(col.name)
    return SchemaStep(
        kind=StepKind.ALTER_TYPE,
        schema=col.schema,
        table=col.table,
        column=col.name,
        sql=f"ALTER TABLE {table} ALTER COLUMN {c} TYPE bytea USING NULL",
        description=f"change column {col.column_id} from {current_type} to bytea (it holds no values)",
        guard=f"SELECT NOT EXISTS (SELECT 1 FROM {table} WHERE {c} IS NOT NULL)",  # noqa: S608 - quoted names
    )


def _add_constraint(col: ProtectedColumn) -> SchemaStep:
    name = constraint_name(col.name)
    return SchemaStep(
        kind=StepKind.ADD_CONSTRAINT,
        schema=col.schema,
        table=col.table,
        column=col.name,
        sql=(
            f"ALTER TABLE {qualified(col.schema, col.table)} ADD CONSTRAINT {quote_ident(name)}"
            f" CHECK ({envelope_check(col.name)})"
        ),
        description=f"add CHECK constraint {name} on {col.schema}.{col.table}: {col.name} holds only envelopes",
    )


def _validate_constraint(col: ProtectedColumn) -> SchemaStep:
    name = constraint_name(col.name)
    return SchemaStep(
        kind=StepKind.VALIDATE_CONSTRAINT,
        schema=col.schema,
        table=col.table,
        column=col.name,
        sql=f"ALTER TABLE {qualified(col.schema, col.table)} VALIDATE CONSTRAINT {quote_ident(name)}",
        description=f"validate CHECK constraint {name} on {col.schema}.{col.table}",
    )


# ---------------------------------------------------------------------------------------------------
# Planning and applying (I/O)
# ---------------------------------------------------------------------------------------------------


async def _holds_values(conn: SchemaConnection, col: ProtectedColumn) -> bool:
    table, c = qualified(col.schema, col.table), quote_ident(col.name)
    query = f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {c} IS NOT NULL)"  # noqa: S608 - quoted names
    return bool(await conn.fetchval(query))


async def _holds_non_envelopes(conn: SchemaConnection, col: ProtectedColumn) -> bool:
    table = qualified(col.schema, col.table)
    query = f"SELECT EXISTS (SELECT 1 FROM {table} WHERE NOT ({envelope_check(col.name)}))"  # noqa: S608
    return bool(await conn.fetchval(query))


async def plan_schema(conn: SchemaConnection, config_catalog: Catalog) -> list[SchemaStep]:
    """The steps that make the database ready for ``config_catalog``; empty when it already is.

    Raises ``SchemaRefused`` listing every column that cannot be made ready without touching data (and
    every missing table: pgveil adds columns to tables, it does not create them).
    """
    found = await read_tables(conn, config_catalog.tables)
    steps: list[SchemaStep] = []
    refusals: list[str] = []
    for key, table in config_catalog.tables.items():
        info = found.get(key)
        if info is None:
            refusals.append(f"table {table.qualified_name} does not exist; create it first")
            continue
        if info.relkind not in TABLE_RELKINDS:
            refusals.append(f"{table.qualified_name} is {info.kind_name}; only tables can hold protected columns")
            continue
        for col in table.columns.values():
            current = info.column(col.name)
            check = info.constraint(constraint_name(col.name))
            if not col.encrypted:
                # A plain governed column stays as the application made it; one that was encrypted is a
                # configuration error (a config written when ``encrypt`` defaulted to true).
                if current is not None and current.is_bytea and check is not None and check.kind == "c":
                    refusals.append(
                        f"column {col.column_id} is configured plain but encrypted in the database: set encrypt: true"
                    )
                continue
            if check is not None and check.kind != "c":
                refusals.append(
                    f"{table.qualified_name} has a constraint named {check.name} that is not a CHECK constraint;"
                    " rename or drop it"
                )
                continue
            if current is None:
                steps += [_add_column(col), _add_constraint(col)]
            elif not current.is_bytea:
                reason = await _why_not_convertible(conn, col, current, has_check=check is not None)
                if reason:
                    refusals.append(reason)
                else:
                    steps += [_alter_type(col, current.type_name), _add_constraint(col)]
            elif check is None or not check.validated:
                if await _holds_non_envelopes(conn, col):
                    refusals.append(
                        f"column {col.column_id} holds values that are not pgveil envelopes: if they are its"
                        " plaintext, `pgveil encrypt` encrypts them online (docs/encrypt-existing.md); otherwise"
                        " move them out first"
                    )
                else:
                    steps.append(_add_constraint(col) if check is None else _validate_constraint(col))
    if refusals:
        raise SchemaRefused(refusals)
    return steps


# DDL made without pgveil (a migration run directly, a DBA's psql) must reach every pgveil instance
# before it can matter: the event trigger notifies CATALOG_CHANNEL at the end of every DDL command and
# every drop, and each instance, LISTENing on its service connection, reads its catalog again. The
# notification is delivered at commit; its payload names the relations the command touched (so that
# statements naming them wait for the reload) and is only a hint (see encrypt/runtime.py).
CATALOG_CHANNEL: Final = "pgveil_catalog"
EVENT_TRIGGERS: Final = ("pgveil_catalog_ddl", "pgveil_catalog_drop")
_EVENT_TRIGGER_SQL: Final = f"""
CREATE SCHEMA IF NOT EXISTS pgveil;
CREATE OR REPLACE FUNCTION pgveil.notify_catalog_change() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    names text;
BEGIN
    IF TG_EVENT = 'sql_drop' THEN
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger_dropped_objects() WHERE NOT is_temporary) THEN
            RETURN;
        END IF;
        SELECT string_agg(DISTINCT object_name, ',') INTO names
        FROM pg_catalog.pg_event_trigger_dropped_objects() WHERE object_name IS NOT NULL AND NOT is_temporary;
    ELSE
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger_ddl_commands()
                       WHERE schema_name IS DISTINCT FROM 'pg_temp') THEN
            RETURN;  -- only temporary objects: they live in the session that made them, not through pgveil
        END IF;
        -- The relations the command touched, with their direct children and parents (ATTACH PARTITION
        -- reports only the parent).
        WITH touched AS (
            SELECT d.objid FROM pg_catalog.pg_event_trigger_ddl_commands() d
            WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
        ), related AS (
            SELECT objid FROM touched
            UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN touched t ON i.inhparent = t.objid
            UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN touched t ON i.inhrelid = t.objid
        )
        SELECT string_agg(DISTINCT c.relname, ',') INTO names
        FROM related r JOIN pg_catalog.pg_class c ON c.oid = r.objid
        WHERE c.relpersistence <> 't';
    END IF;
    IF pg_catalog.length(coalesce(names, '')) > 7000 THEN
        names := '*';  -- too many to name (NOTIFY payloads are short): everything waits for the reload
    END IF;
    PERFORM pg_catalog.pg_notify('{CATALOG_CHANNEL}', coalesce(names, ''));
END
$$;
DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGERS[0]};
DROP EVENT TRIGGER IF EXISTS {EVENT_TRIGGERS[1]};
CREATE EVENT TRIGGER {EVENT_TRIGGERS[0]} ON ddl_command_end EXECUTE FUNCTION pgveil.notify_catalog_change();
CREATE EVENT TRIGGER {EVENT_TRIGGERS[1]} ON sql_drop EXECUTE FUNCTION pgveil.notify_catalog_change();
"""  # noqa: S608 - built from constants only


async def plan_event_trigger(conn: SchemaConnection) -> list[SchemaStep]:
    """The step that installs the event triggers notifying pgveil of DDL, unless both are installed and
    enabled. Creating an event trigger needs a superuser."""
    enabled = await conn.fetchval(
        "SELECT count(*) FROM pg_catalog.pg_event_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.evtfoid "
        "WHERE t.evtname = ANY($1::text[]) AND t.evtenabled <> 'D' AND p.prosrc LIKE '%pg_event_trigger_%'",
        list(EVENT_TRIGGERS),
    )
    if enabled == len(EVENT_TRIGGERS):
        return []
    return [
        SchemaStep(
            StepKind.EVENT_TRIGGER,
            "pgveil",
            "",
            "",
            _EVENT_TRIGGER_SQL.strip(),
            f"install event triggers {', '.join(EVENT_TRIGGERS)} that notify pgveil of DDL",
        )
    ]


async def _why_not_convertible(
    conn: SchemaConnection, col: ProtectedColumn, current: ColumnInfo, *, has_check: bool
) -> str | None:
    what = f"column {col.column_id} is {current.type_name}"
    if current.generated:
        return f"{what} and generated; a generated column cannot be encrypted"
    if current.identity:
        return f"{what} and an identity column; an identity column cannot be encrypted"
    if current.has_default:
        return f"{what} with a DEFAULT, which would store plaintext; drop the default first"
    if has_check:
        return f"{what} but already has a constraint named {constraint_name(col.name)}; drop it first"
    if await _holds_values(conn, col):
        return f"{what} and holds values: `pgveil encrypt` encrypts them online (docs/encrypt-existing.md)"
    return None


async def apply_schema(conn: SchemaConnection, steps: list[SchemaStep]) -> None:
    """Runs ``steps`` in one transaction: all of them or none.

    The tables are locked first (ACCESS EXCLUSIVE, in name order, so two concurrent applies cannot
    deadlock), then each guard is re-checked, so a value written since planning is never overwritten.
    Raises ``SchemaRefused``; the transaction is then rolled back.
    """
    if not steps:
        return
    tables = sorted({(s.schema, s.table) for s in steps if s.table})
    async with conn.transaction():
        for schema, table in tables:
            await conn.execute(f"LOCK TABLE {qualified(schema, table)} IN ACCESS EXCLUSIVE MODE")
        for step in steps:
            if step.guard is not None and not await conn.fetchval(step.guard):
                column_id = f"{step.schema}.{step.table}.{step.column}"
                raise SchemaRefused(
                    [f"{step.description}: {column_id} received values since the plan was made; nothing was changed"]
                )
            try:
                await conn.execute(step.sql)
            except asyncpg.PostgresError as e:
                # The primary message only: DETAIL may quote a failing row.
                message = getattr(e, "message", None) or type(e).__name__
                sqlstate = getattr(e, "sqlstate", None) or "?"
                raise SchemaRefused(
                    [f"{step.description}: PostgreSQL refused it ({sqlstate}): {message}; nothing was changed"]
                ) from e
            log.info("schema: %s", step.description)
