"""float4 (real) and float8 (double precision).

Canonical form: the binary wire format (IEEE 754 big-endian, 4 or 8 bytes), with every NaN
collapsed to the one quiet NaN PostgreSQL produces for ``'NaN'`` (PostgreSQL treats all NaNs as
equal, so they must encrypt and index the same). -0 stays distinct from 0: PostgreSQL prints it as
``-0``.

Text input emulates PostgreSQL 15 on glibc: ``strtod``/``strtof`` syntax (decimal, hexadecimal
``0x1.8p3``, ``inf``/``infinity``/``nan`` in any case, C whitespace around), correctly rounded
straight to the target width (float4 does not go through a double, like ``strtof``), and 22003
when the value overflows or underflows to zero.

Text output is PostgreSQL 15's default (``extra_float_digits`` > 0, which drivers do not lower):
the shortest digits that read back to the same value, in fixed notation when the decimal exponent
is in [-4, 15) for float8 or [-4, 6) for float4, otherwise ``d.ddde+XX``. ``extra_float_digits`` is
not reported to the proxy, so a session that sets it to 0 or less still gets the shortest form.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, ascii_input, invalid_syntax
from proxy.pgtypes.errors import InvalidBinaryRepresentation, NumericValueOutOfRange

_WS = rb"[ \t\n\r\v\f]*+"
_FLOAT = re.compile(
    _WS + rb"(?:(?P<dec>[+-]?(?:[0-9]++(?:\.[0-9]*+)?|\.[0-9]++)(?:[eE][+-]?[0-9]++)?)"
    rb"|(?P<hex>[+-]?0[xX](?:[0-9a-fA-F]++(?:\.[0-9a-fA-F]*+)?|\.[0-9a-fA-F]++)(?:[pP][+-]?[0-9]++)?)"
    rb"|(?P<inf>[+-]?inf(?:inity)?)"
    rb"|(?P<nan>[+-]?nan(?:\([0-9a-zA-Z_]*\))?))" + _WS,
    re.IGNORECASE,
)
_NONZERO_MANTISSA = re.compile(rb"[1-9a-f]")
_HEX_PARTS = re.compile(rb"([+-]?)0[xX]([0-9a-fA-F]*)(?:\.([0-9a-fA-F]*))?(?:[pP]([+-]?[0-9]+))?")

_F4 = struct.Struct(">f")
_F8 = struct.Struct(">d")
_NAN4 = b"\x7f\xc0\x00\x00"
_NAN8 = b"\x7f\xf8\x00\x00\x00\x00\x00\x00"
_F4_INF_BITS = 0x7F800000
_TWO_128 = 2.0**128  # where float4 infinity starts for rounding purposes
_EXACT_DIGITS = 800  # enough to decide any float4 rounding tie; see _exact_decimal


@dataclass(frozen=True, slots=True)
class FloatCodec:
    name: str
    oid: int
    typlen: int
    array_oid: int
    sql_name: str
    typmod: int = -1

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        m = _FLOAT.fullmatch(ascii_input(data, fmt, self.sql_name))
        if m is None:
            raise invalid_syntax(self.sql_name)
        kind = m.lastgroup
        token = m.group(kind or "dec")
        negative = token[:1] == b"-"
        if kind == "nan":
            return _NAN8 if self.typlen == 8 else _NAN4
        if kind == "inf":
            value = -math.inf if negative else math.inf
        else:
            value = self._parse_number(token, hexadecimal=kind == "hex")
        return self._pack(value)

    def _parse_number(self, token: bytes, *, hexadecimal: bool) -> float:
        if hexadecimal:
            try:
                value = float.fromhex(token.decode("ascii"))
            except OverflowError:
                raise self._out_of_range() from None
        else:
            value = float(token)
        if self.typlen == 4 and math.isfinite(value) and value != 0.0:
            value = _to_float4(value, token, hexadecimal=hexadecimal)
        if math.isinf(value):
            raise self._out_of_range()
        if value == 0.0 and _has_nonzero_mantissa(token, hexadecimal=hexadecimal):
            # glibc reports underflow to zero as ERANGE, which PostgreSQL turns into 22003.
            raise self._out_of_range()
        return value

    def _pack(self, value: float) -> bytes:
        if self.typlen == 8:
            return _F8.pack(value)
        return _F4.pack(value)

    def _out_of_range(self) -> NumericValueOutOfRange:
        return NumericValueOutOfRange(f"value is out of range for type {self.sql_name}")

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) != self.typlen:
            raise InvalidBinaryRepresentation(f"incorrect binary data format for type {self.sql_name}")
        exp_mask = 0x7FF0 if self.typlen == 8 else 0x7F80
        high = int.from_bytes(data[:2], "big")
        if high & exp_mask == exp_mask:
            value = (_F8 if self.typlen == 8 else _F4).unpack(data)[0]
            if math.isnan(value):
                return _NAN8 if self.typlen == 8 else _NAN4
        return data

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        if self.typlen == 8:
            return format_float8(_F8.unpack(canonical)[0])
        return format_float4(_F4.unpack(canonical)[0])

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


FLOAT4 = FloatCodec("float4", 700, 4, 1021, "real")
FLOAT8 = FloatCodec("float8", 701, 8, 1022, "double precision")


def _has_nonzero_mantissa(token: bytes, *, hexadecimal: bool) -> bool:
    body = token.lstrip(b"+-").lower()
    if hexadecimal:
        return _NONZERO_MANTISSA.search(body[2:].partition(b"p")[0]) is not None
    return _NONZERO_MANTISSA.search(body.partition(b"e")[0]) is not None


# -- output ---------------------------------------------------------------------------------------
#
# PostgreSQL prints floats with Ryu compiled without STRICTLY_SHORTEST: the shortest digits that lie
# strictly inside the interval of reals that round to the value (a decimal exactly halfway to a
# neighbour is never chosen, even where round-half-even would read it back correctly), correctly
# rounded at that length; integers below 2^53 (float4: 2^24) are printed exactly.


def _special(value: float) -> bytes | None:
    if value != value:
        return b"NaN"
    if value == math.inf:
        return b"Infinity"
    if value == -math.inf:
        return b"-Infinity"
    if value == 0.0:
        return b"-0" if math.copysign(1.0, value) < 0 else b"0"
    return None


def format_float8(value: float) -> bytes:
    """PostgreSQL 15's float8out for ``extra_float_digits`` > 0."""
    special = _special(value)
    if special is not None:
        return special
    magnitude = abs(value)
    if 1.0 <= magnitude < 9007199254740992.0 and magnitude.is_integer():
        digits = str(int(magnitude))
        return _layout(digits.rstrip("0"), len(digits) - 1, value < 0, 15)
    bits = int.from_bytes(_F8.pack(magnitude), "big")
    mantissa, exponent2 = _decompose(bits, 52, 11)
    # Python's repr is the shortest closed-interval form; it differs from Ryu's only when it sits
    # exactly on an interval boundary, which the check below detects.
    digits, exponent = _repr_digits(magnitude)
    if not _strictly_inside(digits, exponent, mantissa, exponent2, bits, 52):
        digits, exponent = _shortest_inside(magnitude, mantissa, exponent2, bits, 52, 17)
    return _layout(digits, exponent, value < 0, 15)


def format_float4(value: float) -> bytes:
    """PostgreSQL 15's float4out for ``extra_float_digits`` > 0."""
    special = _special(value)
    if special is not None:
        return special
    magnitude = abs(value)
    if 1.0 <= magnitude < 16777216.0 and magnitude.is_integer():
        digits = str(int(magnitude))
        return _layout(digits.rstrip("0"), len(digits) - 1, value < 0, 6)
    bits = int.from_bytes(_F4.pack(magnitude), "big")
    mantissa, exponent2 = _decompose(bits, 23, 8)
    digits, exponent = _shortest_inside(magnitude, mantissa, exponent2, bits, 23, 9)
    return _layout(digits, exponent, value < 0, 6)


def _decompose(bits: int, mantissa_bits: int, exponent_bits: int) -> tuple[int, int]:
    """(M, E) with value = M * 2**E, for a positive finite IEEE value given by its bits."""
    bias = (1 << (exponent_bits - 1)) - 1
    fraction = bits & ((1 << mantissa_bits) - 1)
    biased = bits >> mantissa_bits
    if biased == 0:
        return fraction, 1 - bias - mantissa_bits
    return fraction | (1 << mantissa_bits), biased - bias - mantissa_bits


def _repr_digits(magnitude: float) -> tuple[str, int]:
    """Significant digits (no leading or trailing zeros) and decimal exponent of repr()."""
    mantissa, _, exp_text = repr(magnitude).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = int_part + frac_part
    exponent = (int(exp_text) if exp_text else 0) + len(int_part) - 1
    stripped = digits.lstrip("0")
    return stripped.rstrip("0"), exponent - (len(digits) - len(stripped))


@functools.lru_cache(maxsize=1024)
def _pow10(n: int) -> int:
    result: int = 10**n
    return result


def _compare(m: int, k: int, n: int, g: int) -> int:
    """Sign of m * 10**k - n * 2**g, in integers."""
    a = -k if k < 0 else 0
    b = -g if g < 0 else 0
    left = m * _pow10(k + a) << b
    right = n * _pow10(a) << (g + b)
    return (left > right) - (left < right)


def _bounds(mantissa: int, bits: int, mantissa_bits: int) -> tuple[int, int]:
    """Interval ends around the value, in units of 2**(E-2): (4M - 1 or 2, 4M + 2)."""
    narrow = (bits & ((1 << mantissa_bits) - 1)) == 0 and (bits >> mantissa_bits) > 1
    return 4 * mantissa - (1 if narrow else 2), 4 * mantissa + 2


def _strictly_inside(digits: str, exponent: int, mantissa: int, exponent2: int, bits: int, width: int) -> bool:
    m, k = int(digits), exponent - len(digits) + 1
    low, high = _bounds(mantissa, bits, width)
    return _compare(m, k, low, exponent2 - 2) > 0 and _compare(m, k, high, exponent2 - 2) < 0


def _shortest_inside(
    magnitude: float, mantissa: int, exponent2: int, bits: int, width: int, max_digits: int
) -> tuple[str, int]:
    low, high = _bounds(mantissa, bits, width)
    g = exponent2 - 2
    # For float4 the interval ends (26 significant bits) are exact doubles, so comparing the
    # candidate's nearest double with them settles every case but a tie, which the exact integer
    # comparison then decides. float8 ends need 54 bits: always compare exactly.
    fast = width == 23
    low_double, high_double = (math.ldexp(low, g), math.ldexp(high, g)) if fast else (0.0, 0.0)

    def inside(m: int, k: int, approx: float) -> bool:
        if fast:
            if approx < low_double or approx > high_double:
                return False
            if low_double < approx < high_double:
                return True
        return _compare(m, k, low, g) > 0 and _compare(m, k, high, g) < 0

    def candidate(precision: int) -> tuple[str, int] | None:
        text = f"{magnitude:.{precision - 1}e}"
        mant_text, _, exp_text = text.partition("e")
        digits = mant_text.replace(".", "")
        exponent = int(exp_text)
        m, k = int(digits), exponent - precision + 1
        approx = float(text)
        if inside(m, k, approx):
            return digits.rstrip("0"), exponent
        # At a power of two the interval is lopsided: the nearest candidate may fall just outside
        # the narrow side while its neighbour on the wide side is inside.
        below = approx < magnitude if approx != magnitude else _compare(m, k, 4 * mantissa, g) < 0
        other = m + 1 if below else m - 1
        if other > 0 and inside(other, k, float(f"{other}e{k}")):
            other_digits = str(other)
            return other_digits.rstrip("0"), exponent + len(other_digits) - precision
        return None

    for precision in range(1, max_digits + 1):
        found = candidate(precision)
        if found is not None:
            return found
    raise AssertionError("the maximum number of digits always identifies the value")


def _layout(digits: str, exponent: int, negative: bool, fixed_limit: int) -> bytes:
    """Places the decimal point as PostgreSQL's Ryu-based output does (printf %g thresholds)."""
    sign = "-" if negative else ""
    if -4 <= exponent < fixed_limit:
        if exponent < 0:
            text = "0." + "0" * (-exponent - 1) + digits
        elif len(digits) <= exponent + 1:
            text = digits + "0" * (exponent + 1 - len(digits))
        else:
            text = digits[: exponent + 1] + "." + digits[exponent + 1 :]
    else:
        text = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        text += f"e{'+' if exponent >= 0 else '-'}{abs(exponent):02d}"
    return (sign + text).encode("ascii")


# -- correctly rounded float4 ---------------------------------------------------------------------


def _f4_from_bits(bits: int) -> float:
    if bits >= _F4_INF_BITS:
        return _TWO_128
    return float(_F4.unpack(bits.to_bytes(4, "big"))[0])


def _to_float4(value: float, token: bytes, *, hexadecimal: bool) -> float:
    """The float4 nearest the exact value of ``token``, given ``value``, its nearest double.

    Rounding the double to float4 is right except when the double lands exactly on the midpoint
    between two float4s (the exact value may lie on either side, or on it): only then compare
    against the exact value.
    """
    magnitude = abs(value)
    try:
        nearest = abs(_F4.unpack(_F4.pack(magnitude))[0])
        bits = int.from_bytes(_F4.pack(nearest), "big")
    except OverflowError:
        nearest, bits = math.inf, _F4_INF_BITS
    if nearest == magnitude:
        return value
    low_bits = bits - 1 if (nearest > magnitude) else bits
    low, high = _f4_from_bits(low_bits), _f4_from_bits(low_bits + 1)
    midpoint = (low + high) / 2
    if magnitude == midpoint:
        exact = abs(_exact_hex(token) if hexadecimal else _exact_decimal(token))
        if exact > Fraction(midpoint):
            nearest = high
        elif exact < Fraction(midpoint):
            nearest = low
    if nearest >= _TWO_128:
        nearest = math.inf
    return math.copysign(nearest, value)


def _decimal_to_float4(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value == 0.0:
        return value
    return _to_float4(value, text.encode("ascii"), hexadecimal=False)


def _exact_decimal(token: bytes) -> Fraction:
    """The value of a decimal token, exactly up to ``_EXACT_DIGITS`` significant digits.

    Longer mantissas are cut and a sticky unit is added one place below the cut, which keeps the
    value strictly between the cut value and the next one: enough to compare it with any float4
    midpoint (those need far fewer digits), and it keeps ``int()`` within its digit limit.
    """
    negative = token[:1] == b"-"
    body = token.lstrip(b"+-").lower()
    mantissa, _, exp_text = body.partition(b"e")
    int_part, _, frac_part = mantissa.partition(b".")
    digits = (int_part + frac_part).lstrip(b"0")
    exponent = (int(exp_text) if exp_text else 0) - len(frac_part)
    if not digits:
        return Fraction(0)
    sticky = False
    if len(digits) > _EXACT_DIGITS:
        exponent += len(digits) - _EXACT_DIGITS
        sticky = digits[_EXACT_DIGITS:].strip(b"0") != b""
        digits = digits[:_EXACT_DIGITS]
    numerator = int(digits) * 10 + (1 if sticky else 0)
    exponent -= 1
    result = Fraction(numerator) * Fraction(10) ** exponent
    return -result if negative else result


def _exact_hex(token: bytes) -> Fraction:
    m = _HEX_PARTS.fullmatch(token)
    assert m is not None
    sign, int_part, frac_part, exp_text = m.group(1), m.group(2), m.group(3) or b"", m.group(4)
    mantissa = int((int_part + frac_part) or b"0", 16)
    exponent = (int(exp_text) if exp_text else 0) - 4 * len(frac_part)
    result = Fraction(mantissa) * Fraction(2) ** exponent
    return -result if sign == b"-" else result
