"""int2, int4 and int8.

Canonical form: the binary wire format (big-endian two's complement, 2, 4 or 8 bytes), so binary
output is the canonical bytes themselves.

Text input follows PostgreSQL 15's ``pg_strtoint16/32/64``: C whitespace around, an optional sign,
decimal digits only (no underscores, no hex: those arrived in PostgreSQL 16). Digits that overflow
report 22003 even if junk follows them, as PostgreSQL checks the range while it reads the digits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, ascii_input, invalid_syntax
from proxy.pgtypes.errors import InvalidBinaryRepresentation, NumericValueOutOfRange

# Possessive quantifiers: no backtracking, so a long run of digits followed by junk stays linear.
_INT = re.compile(rb"[ \t\n\r\v\f]*+([+-]?)([0-9]++)[ \t\n\r\v\f]*+")
_INT_PREFIX = re.compile(rb"[ \t\n\r\v\f]*+([+-]?)([0-9]++)")


@dataclass(frozen=True, slots=True)
class IntegerCodec:
    name: str
    oid: int
    typlen: int
    array_oid: int
    sql_name: str
    typmod: int = -1

    def _parse(self, data: bytes) -> int:
        m = _INT.fullmatch(data)
        if m is None:
            prefix = _INT_PREFIX.match(data)
            if prefix is not None and self._value(prefix.group(1), prefix.group(2)) is None:
                raise self._out_of_range()
            raise invalid_syntax(self.sql_name)
        value = self._value(m.group(1), m.group(2))
        if value is None:
            raise self._out_of_range()
        return value

    def _value(self, sign: bytes, digits: bytes) -> int | None:
        digits = digits.lstrip(b"0")
        # The length test keeps int() away from enormous digit strings.
        if len(digits) > 20:
            return None
        value = int(digits or b"0")
        if sign == b"-":
            value = -value
        limit = 1 << (self.typlen * 8 - 1)
        return value if -limit <= value < limit else None

    def _out_of_range(self) -> NumericValueOutOfRange:
        return NumericValueOutOfRange(f"value is out of range for type {self.sql_name}")

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        value = self._parse(ascii_input(data, fmt, self.sql_name))
        return value.to_bytes(self.typlen, "big", signed=True)

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) != self.typlen:
            raise InvalidBinaryRepresentation(f"incorrect binary data format for type {self.sql_name}")
        return data

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        return b"%d" % int.from_bytes(canonical, "big", signed=True)

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


INT2 = IntegerCodec("int2", 21, 2, 1005, "smallint")
INT4 = IntegerCodec("int4", 23, 4, 1007, "integer")
INT8 = IntegerCodec("int8", 20, 8, 1016, "bigint")
