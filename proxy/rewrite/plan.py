"""The result of analysing one statement text: what to encrypt, what to decrypt, what to refuse.

Plans are immutable values. The session caches them by statement text and reuses them for every
execution, so nothing here may hold per-execution state: literal ciphertexts are passed in when the
rewritten text is built, and a refusal is stored as data and turned into a fresh exception on each use
(an exception object that has been raised carries a traceback whose frames could pin plaintext in a
long-lived cache).

Offsets (``start``/``end``) are indices into the Python ``str`` that was analysed (code points, not
the UTF-8 byte offsets libpg_query reports), half-open.

Must not: parse SQL, do I/O, or show literal values or statement text in ``repr``.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from proxy.errors import FeatureNotSupported, RefusalReason
from proxy.policy.model import Reference
from proxy.rewrite.catalog import ProtectedColumn, ProtectedTable, SubjectColumn
from proxy.rewrite.refusals import SubjectNotGiven

_EMPTY_PARAMS: Mapping[int, ProtectedColumn] = types.MappingProxyType({})
_EMPTY_SUBJECTS: Mapping[int, SubjectValue] = types.MappingProxyType({})


class StatementKind(Enum):
    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    MERGE = "merge"
    COPY = "copy"
    TRUNCATE = "truncate"
    DDL = "ddl"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a statement is refused; ``error()`` builds the exception the session reports (SQLSTATE 0A000)."""

    message: str
    detail: str | None = None
    hint: str | None = None
    reason: RefusalReason = RefusalReason.CONSTRUCT
    sqlstate: str = "0A000"  # 55000 when pgveil's catalog is behind the database's
    # An INSERT that leaves its rows' subject column to the database: (table, subject column), for which the
    # session may obtain the ids first (refusals.SubjectNotGiven); None for every other refusal.
    generate: tuple[str, str] | None = None

    def error(self) -> FeatureNotSupported:
        if self.generate is not None:
            table, column = self.generate
            return SubjectNotGiven(self.message, hint=self.hint, table=table, subject_column=column)
        e = FeatureNotSupported(self.message, detail=self.detail, hint=self.hint, reason=self.reason)
        e.sqlstate = self.sqlstate
        return e


@dataclass(frozen=True, slots=True, repr=False)
class SubjectValue:
    """Where the data subject of a written row comes from (per-subject keys): a literal of the statement
    text (``literal``: its text as the type's input function reads it) or a Bind parameter (``param``,
    the ``$n`` number). ``subject`` is the table's subject column (kind, name, type class); ``table`` the
    written table's qualified name, for messages."""

    table: str
    subject: SubjectColumn
    literal: str | None = None
    param: int | None = None

    def __repr__(self) -> str:
        source = f"param=${self.param}" if self.param is not None else f"literal=<{len(self.literal or '')} chars>"
        return f"SubjectValue(table={self.table!r}, kind={self.subject.kind!r}, {source})"


@dataclass(frozen=True, slots=True, repr=False)
class LiteralTarget:
    """A literal in the statement text that goes into a protected column and must be encrypted.

    ``start``/``end`` cover the whole literal expression, including a cast (``'2020-01-01'::date``,
    ``CAST('1' AS int)``, ``DATE '2020-01-01'``) or a sign (``-5``). ``plaintext`` is the text the
    type's input function would receive: strings unescaped (``'it''s'`` gives ``it's``, ``E'\\n'`` a
    newline), numbers in decimal, booleans as ``true``/``false``. ``cast_type`` names the type of an
    explicit cast or typed literal in PostgreSQL's internal spelling (``date``, ``int4``,
    ``varchar(10)``, ``timestamptz``), or is None; the value is encrypted as ``column`` either way, so
    the session may refuse a cast it does not accept for the column's declared type.
    """

    start: int
    end: int
    plaintext: str
    column: ProtectedColumn
    cast_type: str | None = None
    numeric: bool = False  # a numeric constant (1.7), not a string ('1.7'): it has a type before any cast
    subject: SubjectValue | None = None  # the row's data subject, for a column with per-subject keys

    def __repr__(self) -> str:
        return (
            f"LiteralTarget(start={self.start}, end={self.end}, plaintext=<{len(self.plaintext)} chars>, "
            f"column={self.column.column_id!r}, cast_type={self.cast_type!r})"
        )


@dataclass(frozen=True, slots=True)
class TextEdit:
    """A fixed change to the statement text that needs no key, e.g. ``$1::text`` → ``$1`` so that the
    server infers ``bytea`` for a parameter that carries ciphertext, or ``NULL::date`` → ``NULL``."""

    start: int
    end: int
    replacement: str


@dataclass(frozen=True, slots=True)
class HiddenOutput:
    """A top-level SELECT list entry that is the stored value of encrypted ``column`` and nothing else:
    for a role that sees the column hidden, the session sends ``CASE WHEN false THEN <the entry> END`` in
    its place. PostgreSQL's parser checks the column reference as before (an ungrouped column is still an
    error, a misspelt one still unknown) and its planner folds the expression to a NULL ``bytea``, so the
    server neither reads out nor sends the envelope. ``name`` is the output name to keep with ``AS`` when
    the entry has no alias of its own (PostgreSQL would name it after the column), else None; ``start``
    and ``end`` span the column reference with any parentheses wrapping only it (``(ssn)``), ``text`` is
    that as the client wrote it.

    Only made where the substitution cannot change anything but the values of that column: a plain
    SELECT (no set operation, no INTO) whose result width the analysis knows. Ordering, grouping or
    DISTINCT ON by such a column is an expression use, refused to a role that does not see it."""

    start: int
    end: int
    column: ProtectedColumn
    name: str | None
    text: str

    def edit(self) -> TextEdit:
        folded = f"CASE WHEN false THEN {self.text} END"
        if self.name is not None:
            folded += ' AS "' + self.name.replace('"', '""') + '"'
        return TextEdit(self.start, self.end, folded)


class CopyDirection(Enum):
    FROM = "from"  # client → server (COPY ... FROM STDIN)
    TO = "to"  # server → client (COPY ... TO STDOUT)


class CopyFormat(Enum):
    TEXT = "text"
    CSV = "csv"
    BINARY = "binary"


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """COPY options as the statement gave them; None means "not given" (the format's default applies).

    ``header_match`` is HEADER MATCH (COPY FROM only). ``force_quote_all`` is FORCE_QUOTE *.
    """

    delimiter: str | None = None
    null: str | None = None
    quote: str | None = None
    escape: str | None = None
    header: bool = False
    header_match: bool = False
    encoding: str | None = None
    force_quote: tuple[str, ...] = ()
    force_quote_all: bool = False
    force_not_null: tuple[str, ...] = ()
    force_null: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """A COPY to or from the client whose rows the session rewrites.

    ``columns`` are the column names in wire order for ``COPY table`` (the statement's list, else the
    table's ``all_columns``); empty for ``COPY (query) TO STDOUT``. ``protected`` is the per-column mask
    of *encrypted* columns in wire order, for both forms: the columns whose values are sealed (FROM) or
    opened (TO). If no entry is set the stream needs no encryption work.

    ``governed`` is the per-column mask of every governed column (encrypted or plain) in wire order, for
    visibility: a plain column is set here and None in ``protected``. None when it equals ``protected``
    (no plain governed column in the stream); read it through :attr:`governed_columns`.
    """

    table: ProtectedTable | None
    direction: CopyDirection
    columns: tuple[str, ...]
    protected: tuple[ProtectedColumn | None, ...]
    format: CopyFormat
    options: CopyOptions
    governed: tuple[ProtectedColumn | None, ...] | None = None
    # COPY FROM into a table with per-subject keys: the wire position of its subject column, whose value
    # in each row chooses the key its encrypted fields are sealed with (-1: none).
    subject_index: int = -1

    @property
    def needs_rewrite(self) -> bool:
        """Whether a value must be sealed or opened (encrypted columns only)."""
        return any(c is not None for c in self.protected)

    @property
    def governed_columns(self) -> tuple[ProtectedColumn | None, ...]:
        """Every governed column in wire order (encrypted and plain), None elsewhere."""
        return self.protected if self.governed is None else self.governed


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """What one statement does with protected columns.

    ``touches_protected`` is False for a statement that references no protected table (after CTE
    shadowing); all other fields are then empty and the statement needs no work. ``refusal`` (see the
    property) is set when the statement must not run. ``literal_targets`` are the literals to encrypt,
    in text order. ``param_targets`` maps ``$n`` to the column its Bind value is encrypted for; the
    server must see those parameters as ``bytea`` (the session declares them so in Parse). ``edits``
    are changes to the text that need no key (see TextEdit).

    ``result_columns`` has one entry per column of the statement's result (SELECT list, RETURNING,
    ``COPY (query) TO``), the protected column whose ciphertext it carries or None. It is None when
    the statement returns no rows, and also when the width of the result cannot be known from the text
    (``SELECT *`` over a relation pgveil has no column list for): then ``result_via_row_description``
    is True and the analysis guarantees that every protected value in the result is a plain column
    reference, which RowDescription reports by table OID and attribute number. Its entries are governed
    columns, encrypted or plain (``ProtectedColumn.encrypted`` tells which): the role's grant decides
    what each becomes.

    ``references`` lists every use of a governed column (see :class:`proxy.policy.model.Reference`), in
    text order without duplicates, whatever the role: the per-role decision is made over them, while the
    plan stays cached per statement text. Uses of encrypted columns that no role may make (functions,
    ordering, ...) are refusals, not references.

    ``cursor`` is the cursor's name for ``DECLARE ... CURSOR``: the references are its query's, and the
    decision must be made when the DECLARE runs; the rows come later from FETCH, whose RowDescription
    names each governed column by table OID and attribute number (the analysis allows a cursor only
    when each governed result column is such a plain column reference). ``cursor_columns`` is then the
    query's result columns as ``result_columns`` would be (None if its width is unknown); the DECLARE
    itself returns no rows (``result_columns`` is None).
    """

    kind: StatementKind
    touches_protected: bool = False
    refusal_reason: Refusal | None = None
    literal_targets: tuple[LiteralTarget, ...] = ()
    param_targets: Mapping[int, ProtectedColumn] = field(default_factory=lambda: _EMPTY_PARAMS)
    # ``$n`` of param_targets whose column has per-subject keys -> where its row's subject comes from.
    param_subjects: Mapping[int, SubjectValue] = field(default_factory=lambda: _EMPTY_SUBJECTS)
    result_columns: tuple[ProtectedColumn | None, ...] | None = None
    result_via_row_description: bool = False
    copy: CopyPlan | None = None
    edits: tuple[TextEdit, ...] = ()
    # DDL that may change what pgveil knows about protected relations: the relation names it touches
    # or creates (lower-cased); the session reloads the catalog before statements on them run again.
    catalog_names: frozenset[str] = frozenset()
    references: tuple[Reference, ...] = ()
    cursor: str | None = None
    cursor_columns: tuple[ProtectedColumn | None, ...] | None = None
    hidden_outputs: tuple[HiddenOutput, ...] = ()

    @property
    def refusal(self) -> FeatureNotSupported | None:
        """A new exception each time (see the module docstring), or None if the statement may run."""
        return None if self.refusal_reason is None else self.refusal_reason.error()

    @property
    def declares_cursor(self) -> bool:
        return self.cursor is not None


@dataclass(frozen=True, slots=True, repr=False)
class QueryPlan:
    """The plan for a whole statement text (several statements for a simple-protocol Query).

    ``statements`` is empty when the text was not parsed because no protected table name occurs in
    it: such a text can only be passed through. ``unparseable`` is set when libpg_query rejected the
    text; it is then refused if it names a protected table and passed through otherwise (the server
    reports the syntax error itself). ``syntax_since`` is the lowest server major version whose scanner
    reads the text as the analysis did (0: any); against an older server the text must be refused,
    whatever it touches, since pgveil's reading of it is not the server's.
    """

    sql: str
    statements: tuple[StatementPlan, ...] = ()
    touches_protected: bool = False
    unparseable: bool = False
    syntax_since: int = 0

    @property
    def refusal(self) -> FeatureNotSupported | None:
        """The first statement's refusal: a multi-statement Query runs as one transaction, so one refused
        statement refuses the whole text."""
        for s in self.statements:
            if s.refusal_reason is not None:
                return s.refusal_reason.error()
        return None

    @property
    def literal_targets(self) -> tuple[LiteralTarget, ...]:
        return tuple(t for s in self.statements for t in s.literal_targets)

    @property
    def references(self) -> tuple[Reference, ...]:
        """Every statement's references, in order (see StatementPlan.references)."""
        return tuple(r for s in self.statements for r in s.references)

    @property
    def param_targets(self) -> Mapping[int, ProtectedColumn]:
        """``$n`` → column for an extended-protocol Parse (one statement); merged if there are several."""
        if len(self.statements) == 1:
            return self.statements[0].param_targets
        merged: dict[int, ProtectedColumn] = {}
        for s in self.statements:
            merged.update(s.param_targets)
        return types.MappingProxyType(merged)

    @property
    def needs_rewrite(self) -> bool:
        """True if the text sent to the server must differ from the client's."""
        return any(s.literal_targets or s.edits for s in self.statements)

    def rewritten_sql(self, ciphertexts: Mapping[LiteralTarget, bytes], extra: Iterable[TextEdit] = ()) -> str:
        """The statement text with every literal target replaced by its ciphertext as a bytea literal
        and every fixed edit applied (and ``extra``, edits that depend on the session's role); everything
        else is the client's text, byte for byte.

        ``ciphertexts`` maps each of ``literal_targets`` to its envelope. A missing target is a bug in
        the caller and raises KeyError: sending the plaintext instead is never an option.
        """
        edits: list[tuple[int, int, str]] = [(e.start, e.end, e.replacement) for e in extra]
        for s in self.statements:
            edits.extend((e.start, e.end, e.replacement) for e in s.edits)
            for t in s.literal_targets:
                edits.append((t.start, t.end, bytea_literal(ciphertexts[t])))
        if not edits:
            return self.sql
        edits.sort()
        out: list[str] = []
        pos = 0
        for start, end, replacement in edits:
            if start < pos:
                raise ValueError("overlapping rewrite spans")
            out.append(self.sql[pos:start])
            out.append(_separated(self.sql, start, end, replacement))
            pos = end
        out.append(self.sql[pos:])
        return "".join(out)

    def __repr__(self) -> str:
        return (
            f"QueryPlan(sql=<{len(self.sql)} chars>, statements={self.statements!r}, "
            f"touches_protected={self.touches_protected}, unparseable={self.unparseable}, "
            f"syntax_since={self.syntax_since})"
        )


def bytea_literal(value: bytes) -> str:
    """``E'\\\\x…'::bytea``: an escape string, so the result is the same whatever the session's
    standard_conforming_strings, and a cast, so the server types it ``bytea`` wherever it stands."""
    return "E'\\\\x" + value.hex() + "'::bytea"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$'\""


def _separated(sql: str, start: int, end: int, replacement: str) -> str:
    """Keeps the replacement a token of its own: ``x='a'WHERE`` is valid SQL, ``x=E'..'::byteaWHERE`` is not."""
    if start > 0 and _is_word_char(sql[start - 1]):
        replacement = " " + replacement
    if end < len(sql) and _is_word_char(sql[end]):
        replacement = replacement + " "
    return replacement
