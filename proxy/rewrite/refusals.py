"""The errors the analysis refuses statements with (SQLSTATE 0A000), worded in one place.

Every message starts ``pgveil:`` and names the column (``schema.table.column``) and the construct, so
an application developer can find the offending expression. Messages never contain literals,
parameters or any other value from the statement.
"""

from __future__ import annotations

from proxy.errors import FeatureNotSupported
from proxy.rewrite.catalog import ProtectedColumn
from proxy.rewrite.scope import ColumnUse

_QUALIFY_HINT = "qualify the column with its table name or alias"


def where(construct: str, clause: str | None) -> str:
    """``construct`` with the clause it stands in, e.g. ``function lower() (in WHERE)``."""
    if clause and clause != construct:
        return f"{construct} (in {clause})"
    return construct


def column_use(use: ColumnUse, construct: str, clause: str | None = None) -> FeatureNotSupported:
    """A protected column used where only its ciphertext would be seen by the server."""
    col = use.column.column_id
    if use.whole_row:
        return FeatureNotSupported(
            f"pgveil: table {use.column.schema}.{use.column.table} has encrypted column {col}; a whole-row "
            f"reference to it cannot be used in {where(construct, clause)}",
            hint="name the columns you need",
        )
    if not use.certain:
        return FeatureNotSupported(
            f'pgveil: column reference "{use.reference}" may refer to encrypted column {col} and cannot be '
            f"used in {where(construct, clause)}",
            hint=_QUALIFY_HINT,
        )
    if use.extra_fields:
        construct = "field selection"
    return FeatureNotSupported(f"pgveil: column {col} is encrypted and cannot be used in {where(construct, clause)}")


def not_searchable(use: ColumnUse, construct: str, clause: str | None = None) -> FeatureNotSupported:
    """Equality on a column without a blind index."""
    if not use.plain or not use.certain:
        return column_use(use, construct, clause)
    return FeatureNotSupported(
        f"pgveil: column {use.column.column_id} is encrypted and not searchable, so it cannot be used in "
        f"{where(construct, clause)}",
        hint="filter on a column that is not encrypted",
    )


def assignment(column: ProtectedColumn, source: str) -> FeatureNotSupported:
    """A protected column set from something the proxy cannot encrypt before the server sees it."""
    return FeatureNotSupported(
        f"pgveil: column {column.column_id} is encrypted and cannot be set from {source}",
        hint="set it from a literal, a $n parameter, NULL or DEFAULT",
    )


def insert_select(column: ProtectedColumn) -> FeatureNotSupported:
    return FeatureNotSupported(
        f"pgveil: INSERT ... SELECT into encrypted column {column.column_id} is only supported from "  # noqa: S608 - a message
        "literals and $n parameters",
        hint="insert the rows with VALUES, or select them through pgveil and insert them back",
    )


def parameter_reuse(number: int, columns: list[ProtectedColumn | None]) -> FeatureNotSupported:
    names = sorted({c.column_id for c in columns if c is not None})
    other = "elsewhere in the statement" if any(c is None for c in columns) else f"for {names[1]}"
    return FeatureNotSupported(
        f"pgveil: parameter ${number} is used for encrypted column {names[0]} and {other}",
        hint="pass the value as a separate parameter for each use",
    )


def statement(message: str, hint: str | None = None) -> FeatureNotSupported:
    return FeatureNotSupported(f"pgveil: {message}", hint=hint)


class SubjectNotGiven(FeatureNotSupported):
    """:func:`subject_unknown` for an INSERT whose VALUES rows leave the subject column to the database
    (not in the column list, or ``DEFAULT``): the session may obtain the ids the database would make and
    supply them (proxy/encrypt/subjectgen.py). ``table`` and ``subject_column`` name what to generate.
    (Keyword-only extras with defaults, so that the exception pickles out of the analysis worker.)"""

    def __init__(self, message: str, *, hint: str | None = None, table: str = "", subject_column: str = "") -> None:
        super().__init__(message, hint=hint)
        self.table = table
        self.subject_column = subject_column


def subject_unknown(
    column: ProtectedColumn, table: str, subject_column: str, construct: str, *, generatable: bool = False
) -> FeatureNotSupported:
    """A value for a column with per-subject keys whose row's data subject the statement does not give."""
    message = (
        f"pgveil: cannot tell the data subject of the row written into encrypted column {column.column_id}: "
        f"table {table} takes its keys from subject column {subject_column}, and {construct} does not give "
        "it as a literal or a $n parameter"
    )
    hint = f"supply {subject_column} as a literal or a parameter in the same row"
    if generatable:
        return SubjectNotGiven(message, hint=hint, table=table, subject_column=subject_column)
    return FeatureNotSupported(message, hint=hint)


def overriding_user_value(table: str, subject_column: str) -> FeatureNotSupported:
    """``INSERT … OVERRIDING USER VALUE`` into a table with per-subject keys: the server would replace the
    subject ids the statement gives (an identity column) after pgveil sealed the row's values for them."""
    message = (
        f"pgveil: table {table} takes its keys from subject column {subject_column}, and with OVERRIDING USER "  # noqa: S608 (a message, not SQL)
        "VALUE the database may replace the subject id the row's values are encrypted for"
    )
    return FeatureNotSupported(
        message, hint="leave out OVERRIDING USER VALUE (leave the subject column out to have the database make it)"
    )


def subject_change(table: str, subject_column: str, construct: str) -> FeatureNotSupported:
    """The subject column of a table with per-subject keys may not be changed through pgveil."""
    return FeatureNotSupported(
        f"pgveil: {construct} cannot change subject column {subject_column} of table {table}: its encrypted "
        "values are sealed with the data subject's key",
        hint="insert the row anew under the other subject and delete the old one",
    )
