"""SQL analysis: from statement text to a QueryPlan (what to encrypt, what to decrypt, what to refuse).

Theory of operation
-------------------
``analyze`` is a pure function of (sql, catalog); the session caches its result by text. It does not
depend on the session's search_path: a name resolves to every protected relation of that name (see
catalog.py), and a name that may mean another relation is refused wherever it matters.

1. Fast path. A statement can only touch a protected table if the table's name occurs in its text, so
   a text in which no protected table name occurs (case-insensitively, and with no ``U&"..."``
   identifier that could spell one) is passed through without parsing. This is the common case.
2. Parse with libpg_query (PostgreSQL's own grammar) into its JSON tree. A text it cannot parse is
   passed through if no identifier token names a protected table (the server reports the error), and
   refused otherwise: pgveil will not forward what it could not analyse.
3. Per statement, a cheap pre-check looks for any table reference that resolves to a protected table;
   without one the statement is passed through however complex it is.
4. Otherwise ``StatementWalker`` walks the statement the way PostgreSQL's parse analysis resolves names
   (query levels, FROM items, aliases, CTEs shadowing tables, ``*`` expansion; see scope.py) and
   classifies each use of a governed column. Every use that may run is recorded on the plan as a
   ``Reference`` (OUTPUT, WRITE, EQUALITY, EXPRESSION, with the construct that names it in a refusal),
   whatever the role: the per-role decision (``proxy.policy``) is made over them per statement, while
   the plan stays cached per text. A *plain* governed column (``encrypted=False``) is never sealed and
   never refused here: each of its uses is a reference. For an *encrypted* column:
   - a value written into it (INSERT, UPDATE SET, ON CONFLICT DO UPDATE SET): a literal becomes a
     LiteralTarget, a ``$n`` a parameter target, NULL and DEFAULT stay; anything else is refused;
   - passed through unchanged into a result (SELECT list, RETURNING, subqueries and CTEs in FROM,
     UNION ALL of the same column): recorded in ``result_columns``;
   - nullness (``IS [NOT] NULL``, ``count(col)``): allowed, nullness is not protected;
   - equality (``=``, ``IN``, ``= ANY``): refused as "not searchable" in one place
     (``StatementWalker._equality``), where blind-index rewriting of searchable columns will hook in;
   - anything else (functions, operators, LIKE, ordering, grouping, joins, casts, CASE, aggregates,
     window functions, DISTINCT): refused, naming the column and the construct.
   The first refusal ends the statement's analysis; the statement is reported refused (0A000) for every
   role. A statement the walker refuses whose governed relations have only plain columns (MERGE, a DO
   block, a construct pgveil cannot follow) is not refused: every governed column of those relations
   becomes an EXPRESSION reference instead, so only a role that sees all of them in plaintext runs it.

Decisions
---------
- Unparseable text is refused with 0A000 (not 42601) when it may name a protected table: the server
  never sees it, and the message says pgveil could not analyse it. Text that names none passes, so
  the server's own syntax error reaches the client unchanged.
- A reference that could mean a protected column or a column of a table pgveil has no column list for
  is refused where a protected column would be (fail closed); qualifying it resolves the doubt.
- Only UNION ALL carries protected columns: UNION, INTERSECT and EXCEPT compare rows, and equal
  plaintexts have unequal ciphertexts, so their results would be silently wrong.
- Partitions, inheritance children and views of a protected table are in the catalog (catalog.py):
  a view's columns that pass a protected column through are that column; a view pgveil could not map
  is opaque (not written through, its columns come back as the stored bytea). Functions and rules
  are opaque. DO blocks that mention a protected table are refused.
- Names do not depend on the search_path: an unqualified name that may mean a protected relation is
  that relation; one that may also mean another relation is refused wherever the statement would
  encrypt, decrypt or refuse something through it (qualifying it resolves the doubt). A temporary
  relation named like a protected one is refused (pg_temp is searched first).
- DDL, TRUNCATE and maintenance statements pass (the server's CHECK constraints guard the columns);
  DDL that may change protected relations lists the names it touches (``catalog_names``) so the
  session reloads the catalog before they are used again, and a later statement of the same text that
  uses them is refused (55000). A write naming a column of a protected relation that the catalog lacks
  is refused with 55000 (the catalog is older than the table).
- ``DECLARE ... CURSOR`` is analysed like its query; FETCH and MOVE are not analysed (their texts name
  no table), and FETCH's RowDescription names each protected column by table OID and attribute number,
  so a cursor is refused only when a protected result column is not a column reference that
  RowDescription reports (a UNION, an ambiguous name). The plan says it declares a cursor, so the
  decision for the role is made when the DECLARE runs.
- SQL-level PREPARE with a parameter for an encrypted column, MERGE, CREATE TABLE AS / SELECT INTO of
  an encrypted column, COPY of one to or from a server file or program, and binary COPY of one are
  refused (for a plain column each is a reference: the role decides).
- Literal plaintexts are what libpg_query reads with standard_conforming_strings on. The session
  (from ParameterStatus) refuses, before analysis, every text whose reading depends on that setting or
  on the client encoding (reading.py), and hands over the text decoded in the client encoding; so what
  the analysis reads is what the server reads.
- libpg_query's grammar is newer than PostgreSQL 15's: it accepts ``0x1F``, ``0o17``, ``0b101``,
  ``1_000`` and a vertical tab as whitespace, where PostgreSQL 15's scanner stops with an error. Every
  text that gets this far (it may name a protected table) is also scanned with PostgreSQL 15's rules
  (lexer.py); if the token boundaries differ, the plan says so (``syntax_since``) and the session
  refuses the text against a server older than 16, whatever it touches: pgveil never gives a meaning
  to a text the server would read otherwise or reject.

Must not: do I/O, keep state between calls, raise anything from ``analyze`` (every failure becomes a
refusal or a pass-through), or put literal values or statement text in messages or logs.
"""

from __future__ import annotations

import json
import logging
import re
import types

from pglast import parser as pg_parser

from proxy.errors import FeatureNotSupported, RefusalReason
from proxy.policy.model import Reference, ReferenceKind
from proxy.rewrite.catalog import Catalog, CatalogStale, ProtectedColumn, ProtectedTable, is_temp_schema
from proxy.rewrite.lexer import scan as scan_pg15
from proxy.rewrite.literals import SourceText
from proxy.rewrite.nodes import Node, first_protected_table, named_in_strings, node_type, relation_names
from proxy.rewrite.plan import QueryPlan, Refusal, StatementKind, StatementPlan
from proxy.rewrite.refusals import SubjectNotGiven
from proxy.rewrite.walker import StatementWalker, plain_governed_references, statement_sql_text_references

log = logging.getLogger(__name__)

__all__ = ["analyze", "needs_analysis"]


def analyze(sql: str, catalog: Catalog) -> QueryPlan:
    """The plan for a statement text (one statement for an extended-protocol Parse, possibly several
    for a simple-protocol Query). Never raises: a statement pgveil cannot handle gets a refusal."""
    if catalog.empty or not _may_mention(sql, catalog):
        return QueryPlan(sql)
    try:
        return _analyze_text(sql, catalog)
    except Exception as exc:  # fail closed: a bug in the analysis must not let a statement through
        log.error("SQL analysis failed unexpectedly (%s); statement refused", type(exc).__name__)
        refusal = Refusal(
            "pgveil: the statement could not be analysed; it is refused because it names a table with encrypted columns"
        )
        return QueryPlan(sql, (StatementPlan(StatementKind.OTHER, True, refusal),), True)


def needs_analysis(sql: str, catalog: Catalog) -> bool:
    """Whether :func:`analyze` does more than its cheap check for ``sql`` (which could name a protected
    table): the caller decides where that work runs."""
    return not catalog.empty and _may_mention(sql, catalog)


# -- fast path and unparseable text ---------------------------------------------------------------------


# What names every function of SQL_TEXT_FUNCTIONS and every relation of STATISTICS_RELATIONS, lower-cased
# (a unit test holds the two lists to this one).
_READS_BY_NAME = ("_to_xml", "dblink", "ts_stat", "ts_rewrite", "crosstab", "connectby", "pg_stats", "pg_statistic")


def _may_mention(sql: str, catalog: Catalog) -> bool:
    """False only if no protected table can be named in ``sql``: its name does not occur in any case,
    and no Unicode-escaped identifier could spell it."""
    lowered = sql.lower()
    if 'u&"' in lowered or "schema" in lowered or "owned" in lowered:
        return True  # also DDL that moves or drops protected tables without naming them
    if any(marker in lowered for marker in _READS_BY_NAME):
        return True  # functions that read tables named by a string, or every table; the statistics views
    if ("exec" in lowered or "language" in lowered) and re.search(r"\bdo\b", lowered):
        return True  # a DO block that may build a table's name at run time (see dynamic_do_references)
    if not sql.isascii() and any(not name.isascii() for _schema, name in catalog.tables):
        return True  # bytes in another client encoding than UTF-8 do not spell the name as str does
    for _schema, name in catalog.tables:
        n = name.lower()
        if n in lowered or ('"' in n and n.replace('"', '""') in lowered):
            return True
    return False


def _identifier_names(sql: str) -> set[str] | None:
    """Lower-cased identifiers and keywords of ``sql`` (quoted identifiers unquoted); None if the text
    cannot even be tokenised or contains a Unicode-escaped identifier."""
    if "\x00" in sql:  # the scanner, like the parser, would stop at the NUL
        return None
    try:
        tokens = pg_parser.scan(sql)
    except Exception:  # pglast raises ParseError, but UnicodeEncodeError etc. mean the same here
        return None
    names: set[str] = set()
    for t in tokens:
        if t.name == "UIDENT":
            return None
        if t.name == "IDENT" or t.kind != "NO_KEYWORD":
            text = sql[t.start : t.end + 1]
            if text.startswith('"'):
                text = text[1:-1].replace('""', '"')
            names.add(text.lower())
    return names


# The first server major version whose scanner reads what libpg_query reads where PostgreSQL 15's does not.
NEWER_SCANNER = 16


def scanned_alike(sql: str) -> bool:
    """Whether PostgreSQL 15's scanner cuts ``sql`` into the same tokens as libpg_query's (comments
    included), without an error. False also if libpg_query cannot scan it."""
    mine = scan_pg15(sql)
    if mine.error is not None:
        return False
    try:
        theirs = pg_parser.scan(sql)
    except Exception:  # pglast raises ParseError, but UnicodeEncodeError etc. mean the same here
        return False
    if len(theirs) != len(mine.tokens):
        return False
    return all(t.start == m.start and t.end + 1 == m.end for t, m in zip(theirs, mine.tokens, strict=True))


def _unparseable(sql: str, catalog: Catalog) -> QueryPlan:
    """libpg_query rejected the text. Pass it through (the server will report the syntax error) unless
    an identifier in it may name a protected table; then refuse, since it could not be checked."""
    names = _identifier_names(sql)
    protected = {name.lower() for _schema, name in catalog.tables}
    if names is not None and not names & protected:
        if not scanned_alike(sql):
            return QueryPlan(sql, unparseable=True, syntax_since=NEWER_SCANNER)
        return QueryPlan(sql, unparseable=True)
    if names is not None:
        # Only relations with plain governed columns: nothing to seal, so the server may report the error;
        # a role that does not see all their columns in plaintext is refused.
        named = [t for t in catalog.tables.values() if t.name.lower() in names]
        columns = {c: None for t in named for c in (*t.columns.values(), *catalog.root_of(t).columns.values())}
        if columns and not any(c.encrypted for c in columns):
            refs = tuple(Reference(c, ReferenceKind.EXPRESSION, UNANALYSED) for c in columns)
            plan = StatementPlan(StatementKind.OTHER, True, references=refs)
            since = 0 if scanned_alike(sql) else NEWER_SCANNER
            return QueryPlan(sql, (plan,), True, unparseable=True, syntax_since=since)
    refusal = Refusal(
        "pgveil: the statement could not be parsed; it is refused because it may name a table with encrypted columns",
        hint="check the statement's syntax",
    )
    return QueryPlan(sql, (StatementPlan(StatementKind.OTHER, True, refusal),), True, unparseable=True)


def _analyze_text(sql: str, catalog: Catalog) -> QueryPlan:
    if "\x00" in sql:  # libpg_query reads a C string: it would stop at the NUL, hiding the rest
        return _unparseable(sql, catalog)
    try:
        tree = json.loads(pg_parser.parse_sql_json(sql))
    except (pg_parser.ParseError, UnicodeError, ValueError, RecursionError):
        return _unparseable(sql, catalog)
    source = SourceText(sql)
    raws = [raw.get("stmt", {}) for raw in tree.get("stmts", [])]
    statements = [_analyze_statement(raw, catalog, source) for raw in raws]
    _after_ddl(raws, statements)
    since = 0 if scanned_alike(sql) else NEWER_SCANNER
    return QueryPlan(sql, tuple(statements), any(s.touches_protected for s in statements), syntax_since=since)


def _after_ddl(raws: list[Node], statements: list[StatementPlan]) -> None:
    """A statement after DDL that changes protected relations, in the same text, was analysed with the
    catalog from before that DDL: if it uses a protected relation or names one the DDL changed or
    created (a renamed table, a new partition), it is refused (55000) rather than read with a stale
    catalog. DDL, transaction control and statements on other relations stay."""
    changed: set[str] = set()
    for i, st in enumerate(statements):
        if changed and st.kind is not StatementKind.DDL and st.refusal_reason is None:
            names = {n.lower() for n in relation_names(raws[i])}
            if st.touches_protected or names & changed:
                statements[i] = StatementPlan(
                    st.kind,
                    True,
                    Refusal(
                        "pgveil: a statement after DDL on a table with encrypted columns, in the same query "
                        "string, is refused: pgveil reads its catalog again after the DDL",
                        hint="send the statement separately, after the DDL",
                        reason=RefusalReason.STALE_CATALOG,
                        sqlstate="55000",
                    ),
                )
        changed |= st.catalog_names


# -- statements -----------------------------------------------------------------------------------------

_KINDS = {
    "SelectStmt": StatementKind.SELECT,
    "InsertStmt": StatementKind.INSERT,
    "UpdateStmt": StatementKind.UPDATE,
    "DeleteStmt": StatementKind.DELETE,
    "MergeStmt": StatementKind.MERGE,
    "CopyStmt": StatementKind.COPY,
    "TruncateStmt": StatementKind.TRUNCATE,
}
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Comment", "Grant", "Define", "SecLabel", "Reassign")
_DDL_NAMES = frozenset({"IndexStmt", "ViewStmt", "RuleStmt", "CompositeTypeStmt", "ImportForeignSchemaStmt"})


def _statement_kind(name: str) -> StatementKind:
    kind = _KINDS.get(name)
    if kind is not None:
        return kind
    if name.startswith(_DDL_PREFIXES) or name in _DDL_NAMES:
        return StatementKind.DDL
    return StatementKind.OTHER


# What starts dynamic SQL in plpgsql code: EXECUTE (also OPEN ... FOR EXECUTE, RETURN QUERY EXECUTE).
_DYNAMIC_CODE = re.compile(r"exec", re.IGNORECASE)


def dynamic_do(body: Node) -> str | None:
    """The construct of a DO block whose code may run SQL built at run time (EXECUTE, or a language
    other than plpgsql, which runs SQL through SPI calls), or None. Such a block may read, change or
    rename a table it never names in its text."""
    language, code = "plpgsql", ""
    for arg in body.get("args", []):
        elem = arg.get("DefElem", {}) if isinstance(arg, dict) else {}
        value = elem.get("arg", {}).get("String", {}).get("sval") if isinstance(elem.get("arg"), dict) else None
        if elem.get("defname") == "language" and isinstance(value, str):
            language = value.lower()
        elif elem.get("defname") == "as" and isinstance(value, str):
            code = value
    if language != "plpgsql":
        return f"a DO block in language {language}"
    return "a DO block with dynamic SQL" if is_dynamic_code(language, code) else None


def is_dynamic_code(language: str, code: str) -> bool:
    """Whether a DO block's code may run SQL built at run time: plpgsql's EXECUTE (in any of its forms),
    or any other language (which runs SQL through its SPI calls)."""
    return language.lower() != "plpgsql" or _DYNAMIC_CODE.search(code) is not None


def dynamic_do_references(body: Node, catalog: Catalog) -> list[Reference]:
    """For a :func:`dynamic_do` block: an EXPRESSION reference to every plain governed column (encrypted
    ones hold only envelopes, and their CHECK refuses anything else), so only a role that sees all of
    them in plaintext may run it."""
    construct = dynamic_do(body)
    return [] if construct is None else plain_governed_references(catalog, construct)


def _dynamic_do_plan(kind: StatementKind, body: Node, catalog: Catalog) -> StatementPlan:
    """A DO block that names no governed table. With dynamic SQL it is also DDL pgveil cannot read: it
    may rename or alter any protected table, so the transaction it runs in refuses statements on them
    until it ends, and the catalog is read again then (catalog_names: every protected name)."""
    if dynamic_do(body) is None:
        return StatementPlan(kind)
    names = frozenset(n.lower() for n in catalog.names)
    return StatementPlan(kind, True, catalog_names=names, references=tuple(dynamic_do_references(body, catalog)))


def _analyze_statement(stmt: Node, catalog: Catalog, source: SourceText) -> StatementPlan:
    name, body = node_type(stmt)
    kind = _statement_kind(name)
    table = first_protected_table(stmt, catalog)
    if table is None and name == "DoStmt":
        table = named_in_strings(body, catalog)
        if table is None:
            return _dynamic_do_plan(kind, body, catalog)
    text_refs = statement_sql_text_references(stmt, catalog)
    if table is None and text_refs:
        first = text_refs[0].column
        table = catalog.lookup(first.schema, first.table) or next(iter(catalog.tables.values()))
    changes = _catalog_names(name, body, catalog, table is not None) if kind is StatementKind.DDL else frozenset()
    if table is None:
        return StatementPlan(kind, bool(changes), catalog_names=changes)
    shadow = _temp_shadow(name, body, catalog)
    if shadow is not None:
        return StatementPlan(kind, True, shadow)
    walker = StatementWalker(catalog, source)
    try:
        result = walker.statement(name, body, table)
        param_targets = walker.param_targets()
    except FeatureNotSupported as exc:
        if isinstance(exc, CatalogStale):
            refusal = Refusal(exc.message, exc.detail, exc.hint, reason=exc.reason, sqlstate=exc.sqlstate)
            return StatementPlan(kind, True, refusal)
        fallback = _plain_fallback(kind, stmt, catalog, changes)
        if fallback is not None:
            return fallback
        if walker.ambiguous:
            return StatementPlan(kind, True, _ambiguous(walker))
        generate = (exc.table, exc.subject_column) if isinstance(exc, SubjectNotGiven) else None
        refusal = Refusal(
            exc.message, exc.detail, exc.hint, reason=exc.reason, sqlstate=exc.sqlstate, generate=generate
        )
        return StatementPlan(kind, True, refusal)
    except RecursionError:
        fallback = _plain_fallback(kind, stmt, catalog, changes)
        if fallback is not None:
            return fallback
        refusal = Refusal(
            f"pgveil: the statement is nested too deeply to analyse; it involves table {table.qualified_name}, "
            "which has encrypted columns",
            hint="simplify the statement",
        )
        return StatementPlan(kind, True, refusal)
    if not walker.touched and not text_refs:
        return StatementPlan(kind)  # every reference was to a CTE that shadows a protected table's name
    plan = StatementPlan(
        kind,
        touches_protected=True,
        literal_targets=tuple(walker.literals),
        param_targets=types.MappingProxyType(param_targets),
        param_subjects=types.MappingProxyType(dict(walker.param_subjects)),
        result_columns=result.result_columns,
        result_via_row_description=result.via_row_description,
        copy=result.copy,
        edits=tuple(walker.edits),
        catalog_names=changes,
        references=tuple(dict.fromkeys((*walker.references, *text_refs))),
        cursor=result.cursor,
        cursor_columns=result.cursor_columns,
        hidden_outputs=tuple(walker.hidden),
    )
    if walker.ambiguous and _needs_certainty(plan, always=walker.ambiguous_always):
        return StatementPlan(kind, True, _ambiguous(walker))
    return plan


# The construct of every reference a statement pgveil cannot analyse column by column makes.
UNANALYSED = "a statement pgveil cannot analyse column by column"


def _plain_fallback(kind: StatementKind, stmt: Node, catalog: Catalog, changes: frozenset[str]) -> StatementPlan | None:
    """A statement the walker refused, when every governed relation it names has only plain columns:
    nothing needs sealing or opening, so no refusal is role-independent. Instead every governed column
    of those relations is an EXPRESSION reference (only a role that sees all of them in plaintext may run
    it). None if an encrypted column may be involved (the refusal stands)."""
    columns: dict[ProtectedColumn, None] = {}
    for table in _governed_relations(stmt, catalog):
        for col in (*table.columns.values(), *catalog.root_of(table).columns.values()):
            if col.encrypted:
                return None
            columns[col] = None
    if not columns:
        return None
    refs = tuple(Reference(c, ReferenceKind.EXPRESSION, UNANALYSED) for c in columns)
    name, body = node_type(stmt)
    if name == "DoStmt" and dynamic_do(body) is not None:  # may also build other names at run time
        refs = tuple(dict.fromkeys((*refs, *dynamic_do_references(body, catalog))))
        changes = changes | {n.lower() for n in catalog.names}
    return StatementPlan(kind, True, catalog_names=changes, references=refs)


def _governed_relations(stmt: Node, catalog: Catalog) -> list[ProtectedTable]:
    """Every governed relation the statement may name: table references (CTE names included, as
    first_protected_table counts them), DROP targets and, in a DO block, names in its strings."""
    found: dict[str, ProtectedTable] = {}
    for name in relation_names(stmt):
        for table in catalog.tables.values():
            if table.name == name:
                found[table.qualified_name] = table
    name, body = node_type(stmt)
    if name == "DoStmt":
        for table in catalog.tables.values():
            if named_in_strings(body, Catalog({(table.schema, table.name): table})) is not None:
                found[table.qualified_name] = table
    return list(found.values())


# -- names that may mean another relation, temporary tables, DDL ------------------------------------------


def _needs_certainty(plan: StatementPlan, *, always: bool) -> bool:
    """Whether the plan seals, rewrites or decrypts anything through a table name (an ambiguous name
    must then be qualified)."""
    if always and plan.kind not in (StatementKind.DDL, StatementKind.OTHER, StatementKind.TRUNCATE):
        return True
    return bool(
        plan.literal_targets
        or plan.param_targets
        or plan.edits
        or plan.result_via_row_description
        or any(c is not None and c.encrypted for c in plan.result_columns or ())
        or (plan.copy is not None and plan.copy.needs_rewrite)
    )


def _ambiguous(walker: StatementWalker) -> Refusal:
    return Refusal(
        f"pgveil: {walker.ambiguous[0]}; the statement is refused because pgveil cannot tell which one the "
        "server will use",
        hint="qualify the table name with its schema",
        reason=RefusalReason.NAME_RESOLUTION,
    )


def _created_relation(name: str, body: Node) -> Node | None:
    """The RangeVar of the relation a statement creates, if it creates one."""
    if name == "CreateStmt":
        return body.get("relation")
    if name == "ViewStmt":
        return body.get("view")
    if name == "CreateSeqStmt":
        return body.get("sequence")
    if name == "CreateTableAsStmt":
        return (body.get("into") or {}).get("rel")
    if name == "SelectStmt":
        return (body.get("intoClause") or {}).get("rel")
    return None


def _temp_shadow(name: str, body: Node, catalog: Catalog) -> Refusal | None:
    """A temporary relation named like a protected one: pg_temp is searched before every other schema,
    so it would take the protected table's place for unqualified names in this session."""
    rv = _created_relation(name, body)
    if not rv:
        return None
    relname = str(rv.get("relname", ""))
    temporary = rv.get("relpersistence") == "t" or is_temp_schema(rv.get("schemaname"))
    table = catalog.lookup(None, relname)
    if not temporary or table is None:
        return None
    return Refusal(
        f"pgveil: a temporary relation named {relname} would shadow table {table.qualified_name}, which has "
        "encrypted columns",
        hint="choose another name for the temporary table",
        reason=RefusalReason.NAME_RESOLUTION,
    )


_SCHEMA_WIDE = frozenset({"DropOwnedStmt", "ReassignOwnedStmt", "AlterObjectSchemaStmt"})


def _catalog_names(name: str, body: Node, catalog: Catalog, names_protected: bool) -> frozenset[str]:
    """The relation names (lower-cased) whose protected state a DDL statement may change: every name
    in it when it names a protected relation, the new name of a rename, every protected name when it
    renames or drops a schema (moving or dropping protected tables without naming them)."""
    renamed = str(body.get("newname", "")) if name == "RenameStmt" else ""
    schema_wide = name in _SCHEMA_WIDE or (
        body.get("renameType") == "OBJECT_SCHEMA" or body.get("removeType") == "OBJECT_SCHEMA"
    )
    if schema_wide:
        return frozenset(n.lower() for n in catalog.names)
    if not names_protected and renamed not in catalog.names:
        return frozenset()
    names = {n.lower() for n in relation_names(body)}
    if renamed:
        names.add(renamed.lower())
    return frozenset(names)
