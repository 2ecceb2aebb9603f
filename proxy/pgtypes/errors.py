"""Errors raised while converting a column value between wire formats and its canonical form.

Each leaf carries the SQLSTATE PostgreSQL itself reports for the same mistake, so a client sees the
error it would see without the proxy. Messages name the type, never the value: the value is the
plaintext the proxy exists to protect. The caller knows the column and adds it with ``in_column``.
"""

from __future__ import annotations

from typing import Self

from proxy.errors import FeatureNotSupported, ProxyError, RefusalReason


class PgTypeError(ProxyError):
    """Root of the value codec errors; ``in_column`` names the column without naming the value."""

    sqlstate = "22000"

    def in_column(self, column: str) -> Self:
        """The same error, its message extended with the column (``schema.table.column``)."""
        err = type(self).__new__(type(self))
        ProxyError.__init__(err, f"{self.message} in column {column}", detail=self.detail, hint=self.hint)
        return err


class ValueInvalid(PgTypeError):
    """A value the declared type cannot hold (class 22, data exception)."""

    sqlstate = "22000"
    reason = RefusalReason.VALUE


class InvalidTextRepresentation(ValueInvalid):
    sqlstate = "22P02"


class InvalidBinaryRepresentation(ValueInvalid):
    sqlstate = "22P03"


class NumericValueOutOfRange(ValueInvalid):
    sqlstate = "22003"


class StringDataRightTruncation(ValueInvalid):
    sqlstate = "22001"


class InvalidDatetimeFormat(ValueInvalid):
    sqlstate = "22007"


class DatetimeFieldOverflow(ValueInvalid):
    sqlstate = "22008"


class InvalidTimeZoneDisplacement(ValueInvalid):
    sqlstate = "22009"


class InvalidParameterValue(ValueInvalid):
    """PostgreSQL uses this class for malformed hex in bytea input."""

    sqlstate = "22023"


class CharacterNotInRepertoire(ValueInvalid):
    """Input bytes that are not valid in the client encoding (PostgreSQL: invalid byte sequence)."""

    sqlstate = "22021"


class UntranslatableCharacter(ValueInvalid):
    sqlstate = "22P05"


class UnsupportedValueFormat(PgTypeError, FeatureNotSupported):
    """Valid for PostgreSQL but not handled by the proxy (a DateStyle, an encoding, ``'now'``)."""

    sqlstate = "0A000"


class UnknownDeclaredType(PgTypeError):
    """The configuration declares a type the proxy has no codec for."""

    sqlstate = "42704"
