"""numeric and numeric(P,S).

Canonical form: PostgreSQL's own text output of the value (ASCII): no exponent, exactly
``dscale`` digits after the point, ``NaN``, ``Infinity``, ``-Infinity``; zero is never negative.
Keeping the display scale matches PostgreSQL (``1.50`` prints as ``1.50``), at a price: ``1.5`` and
``1.50`` are different canonical values, so they encrypt and index differently although PostgreSQL
calls them equal. Text output is the canonical bytes themselves.

Arithmetic is on decimal digit strings, never on Python ints of unbounded size, so a value with
131072 digits costs what its length costs.

Input (PostgreSQL 15 ``numeric_in`` / ``numeric_recv``, then the typmod as an assignment applies
it): round half away from zero to the scale, 22003 when the integer digits exceed P - S, when an
infinity meets a typmod, or when the value leaves numeric's range (weight above 32767 base-10000
digits, display scale above 16383).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from proxy.pgtypes.base import C_SPACE, DEFAULT_FORMAT, SessionFormat, ascii_input, invalid_syntax
from proxy.pgtypes.errors import InvalidBinaryRepresentation, NumericValueOutOfRange

_NUMBER = re.compile(
    rb"[ \t\n\r\v\f]*+([+-]?)(?:([0-9]++)(?:\.([0-9]*+))?|\.([0-9]++))"
    rb"(?:[eE][ \t\n\r\v\f]*+([+-]?[0-9]++))?[ \t\n\r\v\f]*+"
)
# The special spellings numeric_in accepts (any case, blanks around) and their canonical text.
_SPECIALS = (
    (b"nan", b"NaN"),
    (b"infinity", b"Infinity"),
    (b"+infinity", b"Infinity"),
    (b"-infinity", b"-Infinity"),
    (b"inf", b"Infinity"),
    (b"+inf", b"Infinity"),
    (b"-inf", b"-Infinity"),
)
_HEADER = struct.Struct(">hhHH")
_POS, _NEG, _NAN, _PINF, _NINF = 0x0000, 0x4000, 0xC000, 0xD000, 0xF000
_SPECIAL_SIGN = {b"NaN": _NAN, b"Infinity": _PINF, b"-Infinity": _NINF}
_SIGN_SPECIAL = {v: k for k, v in _SPECIAL_SIGN.items()}
_MAX_WEIGHT = 32767
_MAX_DSCALE = 0x3FFF
_MAX_EXPONENT = 2147483647 // 2
_MAX_BINARY_DIGITS = 3000  # NUMERIC_MAX_PRECISION + NUMERIC_MAX_RESULT_SCALE
_NBASE = 10000


@dataclass(frozen=True, slots=True)
class _Decimal:
    """sign * 0.DIGITS * 10**point; ``digits`` has no leading or trailing zeros ("" is zero)."""

    negative: bool
    digits: str
    point: int
    dscale: int


def _overflow() -> NumericValueOutOfRange:
    return NumericValueOutOfRange("value overflows numeric format")


def _parse_numeric(data: bytes) -> bytes | _Decimal:
    """numeric_in's parse: a special value's canonical text, or a finite decimal (syntax only)."""
    m = _NUMBER.fullmatch(data)
    if m is None:
        body = data.strip(C_SPACE).lower()
        for spelling, canonical in _SPECIALS:
            if body == spelling:
                return canonical
        raise invalid_syntax("numeric")
    sign, int_part, frac_part, only_frac, exp_text = m.groups()
    int_digits = int_part.decode("ascii") if int_part is not None else ""
    frac_digits = (frac_part if frac_part is not None else only_frac or b"").decode("ascii")
    exponent = 0
    if exp_text is not None:
        if len(exp_text.lstrip(b"+-").lstrip(b"0")) > 10:
            raise _overflow()
        exponent = int(exp_text)
        if not -_MAX_EXPONENT < exponent < _MAX_EXPONENT:
            raise _overflow()
    all_digits = int_digits + frac_digits
    stripped = all_digits.lstrip("0")
    point = len(int_digits) - (len(all_digits) - len(stripped)) + exponent
    dscale = max(0, len(frac_digits) - exponent)
    digits = stripped.rstrip("0")
    return _Decimal(sign == b"-" and digits != "", digits, point if digits else 0, dscale)


def _round(value: _Decimal, scale: int) -> _Decimal:
    """round_var: half away from zero at ``scale`` digits after the point (negative: before)."""
    dscale = max(scale, 0)
    keep = value.point + scale
    digits = value.digits
    if keep >= len(digits):
        return _Decimal(value.negative, digits, value.point, dscale)
    if keep < 0 or (keep == 0 and digits[0] < "5"):
        return _Decimal(False, "", 0, dscale)
    point = value.point
    kept = digits[:keep]
    if digits[keep] >= "5":
        head = kept.rstrip("9")
        if head:
            kept = head[:-1] + chr(ord(head[-1]) + 1)
        else:
            kept, point = "1", point + 1
    return _Decimal(value.negative, kept.rstrip("0"), point, dscale)


def _check_range(value: _Decimal) -> None:
    """make_result: the value must fit numeric's storage (base-10000 weight, 14-bit scale)."""
    if value.dscale > _MAX_DSCALE or (value.digits and (value.point - 1) // 4 > _MAX_WEIGHT):
        raise _overflow()


def _format_decimal(value: _Decimal) -> bytes:
    """numeric_out of a finite value."""
    digits, point, dscale = value.digits, value.point, value.dscale
    if point <= 0:
        int_text = "0"
        frac = "0" * -point + digits
    else:
        int_text = digits[:point] + "0" * (point - len(digits)) if len(digits) < point else digits[:point]
        frac = digits[point:]
    text = ("-" if value.negative else "") + int_text
    if dscale:
        text += "." + frac + "0" * (dscale - len(frac))
    return text.encode("ascii")


def canonical_numeric_text(data: bytes) -> bytes:
    """numeric_in without a typmod, for JSON numbers (jsonb stores them as numeric)."""
    parsed = _parse_numeric(data)
    if isinstance(parsed, bytes):
        return parsed
    _check_range(parsed)
    return _format_decimal(parsed)


def _decimal_from_canonical(canonical: bytes) -> _Decimal:
    text = canonical.decode("ascii")
    negative = text.startswith("-")
    int_text, _, frac = text.lstrip("-").partition(".")
    all_digits = int_text + frac
    stripped = all_digits.lstrip("0")
    digits = stripped.rstrip("0")
    point = len(int_text) - (len(all_digits) - len(stripped))
    return _Decimal(negative, digits, point if digits else 0, len(frac))


@dataclass(frozen=True, slots=True)
class NumericCodec:
    name: str = "numeric"
    precision: int = -1
    scale: int = 0
    oid: int = 1700
    typlen: int = -1
    array_oid: int = 1231

    @property
    def typmod(self) -> int:
        if self.precision < 0:
            return -1
        return ((self.precision << 16) | (self.scale & 0x7FF)) + 4

    def _apply_typmod(self, value: _Decimal) -> _Decimal:
        """apply_typmod: round to the scale, then the integer digits must fit P - S."""
        if self.precision < 0:
            return value
        max_digits = self.precision - self.scale
        # Far too many integer digits overflow whatever rounding does; deciding early keeps the
        # rounding below on short strings.
        if value.digits and value.point > max_digits + 1:
            raise self._field_overflow()
        rounded = _round(value, self.scale)
        if rounded.digits and rounded.point > max_digits:
            raise self._field_overflow()
        return rounded

    def _field_overflow(self) -> NumericValueOutOfRange:
        limit = self.precision - self.scale
        bound = f"10^{limit}" if limit else "1"
        return NumericValueOutOfRange(
            "numeric field overflow",
            detail=f"A field with precision {self.precision}, scale {self.scale} must round to an "
            f"absolute value less than {bound}.",
        )

    def _special(self, canonical: bytes) -> bytes:
        if self.precision >= 0 and canonical != b"NaN":
            raise NumericValueOutOfRange(
                "numeric field overflow",
                detail=f"A field with precision {self.precision}, scale {self.scale} cannot hold an infinite value.",
            )
        return canonical

    def _finish(self, value: _Decimal) -> bytes:
        # The input function runs without the typmod (PostgreSQL coerces to numeric(P,S)
        # afterwards), so the range check applies to the value as given, before rounding.
        _check_range(value)
        return _format_decimal(self._apply_typmod(value))

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        parsed = _parse_numeric(ascii_input(data, fmt, "numeric"))
        if isinstance(parsed, bytes):
            return self._special(parsed)
        return self._finish(parsed)

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) < 8:
            raise InvalidBinaryRepresentation("insufficient data for type numeric")
        ndigits, weight, sign, dscale = _HEADER.unpack_from(data)
        if ndigits < 0 or ndigits > _MAX_BINARY_DIGITS:
            raise InvalidBinaryRepresentation('invalid length in external "numeric" value')
        if len(data) != 8 + 2 * ndigits:
            raise InvalidBinaryRepresentation("incorrect binary data format for type numeric")
        if sign not in (_POS, _NEG, _NAN, _PINF, _NINF):
            raise InvalidBinaryRepresentation('invalid sign in external "numeric" value')
        if dscale & _MAX_DSCALE != dscale:
            raise InvalidBinaryRepresentation('invalid scale in external "numeric" value')
        groups = struct.unpack_from(f">{ndigits}h", data, 8)
        if any(not 0 <= g < _NBASE for g in groups):
            raise InvalidBinaryRepresentation('invalid digit in external "numeric" value')
        if sign in _SIGN_SPECIAL:
            return self._special(_SIGN_SPECIAL[sign])
        all_digits = "".join([f"{g:04d}" for g in groups])
        point = 4 * (weight + 1)
        # trunc_var: digits the display scale hides are dropped, not rounded.
        keep = point + dscale
        if keep < len(all_digits):
            all_digits = all_digits[: max(keep, 0)]
        stripped = all_digits.lstrip("0")
        digits = stripped.rstrip("0")
        point -= len(all_digits) - len(stripped)
        value = _Decimal(sign == _NEG and digits != "", digits, point if digits else 0, dscale)
        return self._finish(value)

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        return canonical

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if canonical in _SPECIAL_SIGN:
            sign = _SPECIAL_SIGN[canonical]
            # numeric_send reads the display scale of a special value from the short-header bits
            # of its sign word, which yields 32 for the infinities and 0 for NaN.
            return _HEADER.pack(0, 0, sign, (sign & 0x1F80) >> 7)
        value = _decimal_from_canonical(canonical)
        digits, point = value.digits, value.point
        if not digits:
            return _HEADER.pack(0, 0, _POS, value.dscale)
        # Align the digits on base-10000 groups around the decimal point.
        weight = (point - 1) // 4
        lead = 4 * (weight + 1) - point
        padded = "0" * lead + digits
        padded += "0" * (-len(padded) % 4)
        groups = [int(padded[i : i + 4]) for i in range(0, len(padded), 4)]
        while groups and groups[-1] == 0:
            groups.pop()
        header = _HEADER.pack(len(groups), weight, _NEG if value.negative else _POS, value.dscale)
        return header + struct.pack(f">{len(groups)}H", *groups)


NUMERIC = NumericCodec()


def numeric_codec(precision: int, scale: int) -> NumericCodec:
    """numeric(P,S); PostgreSQL 15 allows 1 <= P <= 1000 and -1000 <= S <= 1000."""
    name = f"numeric({precision},{scale})"
    return NumericCodec(name=name, precision=precision, scale=scale)
