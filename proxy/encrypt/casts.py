"""Literal casts bound for encrypted columns: the value PostgreSQL would have stored, computed here.

A literal such as ``'Infinity'::float8`` (psycopg's client-side binding writes those), ``DATE '2020-1-1'``
or ``'2020-01-01 10:00'::timestamp`` reaches a protected column through a cast and, in PostgreSQL, an
assignment conversion to the column's type. The proxy stores the ciphertext of exactly what the server
would have stored, so it follows the server's conversion rules for the pairs below and refuses every other
pair with 0A000 rather than guess. Pure: no I/O.

Rules (PostgreSQL 15, src/backend/utils/adt): integer and numeric to integer round half away from zero
(numeric) or half to even (float, ``rint``); float to numeric keeps DBL_DIG (15) or FLT_DIG (6)
significant digits; bool to text is ``true``/``false``; every other type to text is its output function;
timestamp to timestamptz reads the wall time in the session's TimeZone, timestamptz to timestamp takes the
wall time there; date to timestamp[tz] is midnight.
"""

from __future__ import annotations

import math
import struct
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from proxy.errors import ProxyError, RefusalReason
from proxy.pgtypes import codec_for
from proxy.pgtypes.base import SessionFormat, TypeCodec

TEXT_FAMILY = frozenset({25, 1042, 1043})  # text, bpchar, varchar
INTEGERS = frozenset({21, 23, 20})  # int2, int4, int8
FLOATS = frozenset({700, 701})
NUMERIC = 1700
BOOL = 16
DATE, TIMESTAMP, TIMESTAMPTZ = 1082, 1114, 1184


class CastNotSupported(ProxyError):
    sqlstate = "0A000"
    reason = RefusalReason.CONSTRUCT


class NumericOutOfRange(ProxyError):
    sqlstate = "22003"
    reason = RefusalReason.VALUE


def canonical_through_cast(
    target: TypeCodec,
    cast_type: str,
    literal: bytes,
    fmt: SessionFormat,
    column_id: str,
    *,
    numeric_literal: bool = False,
) -> bytes:
    """The canonical value of ``target`` that ``literal::cast_type`` assigned to the column would store.

    ``numeric_literal``: the literal is a numeric constant (``1.7::int``), which PostgreSQL types as
    numeric first (int4/int8 when it is a plain integer), then casts; a string literal goes straight to
    the cast type's input function."""
    try:
        source = codec_for(cast_type)
    except ProxyError:
        raise _refuse(cast_type, target, column_id) from None
    s, t = source.oid, target.oid
    if s == t or (s in TEXT_FAMILY and t in TEXT_FAMILY):
        return target.canonical_from_text(literal, fmt)
    if not _supported(s, t):
        raise _refuse(cast_type, target, column_id)
    if numeric_literal and s in INTEGERS | FLOATS and not literal.lstrip(b"-").isdigit():
        const = codec_for("numeric")
        value = _numeric_cast(const, source, const.canonical_from_text(literal, fmt), fmt, column_id)
    else:
        value = source.canonical_from_text(literal, fmt)  # the literal must be valid for its own cast first
    if t in TEXT_FAMILY:
        if s == BOOL:
            return target.canonical_from_text(b"true" if source.to_text(value, fmt) == b"t" else b"false", fmt)
        return target.canonical_from_text(source.to_text(value, fmt), fmt)
    if s in INTEGERS | FLOATS | {NUMERIC} and t in INTEGERS | FLOATS | {NUMERIC}:
        return _numeric_cast(source, target, value, fmt, column_id)
    if t in (TIMESTAMP, TIMESTAMPTZ) and s in (DATE, TIMESTAMP, TIMESTAMPTZ):
        text = source.to_text(value, fmt)
        if s == TIMESTAMPTZ:  # to timestamp: the wall time in the session's zone, offset dropped
            text = _strip_offset(text)
        return target.canonical_from_text(text, fmt)
    if t == DATE and s in (TIMESTAMP, TIMESTAMPTZ):
        return target.canonical_from_text(source.to_text(value, fmt)[:10].split(b" ")[0], fmt)
    raise _refuse(cast_type, target, column_id)


def _supported(s: int, t: int) -> bool:
    numbers = INTEGERS | FLOATS | {NUMERIC}
    return (
        (t in TEXT_FAMILY and s != 17)
        or (s in numbers and t in numbers)
        or (t in (TIMESTAMP, TIMESTAMPTZ) and s in (DATE, TIMESTAMP, TIMESTAMPTZ))
        or (t == DATE and s in (TIMESTAMP, TIMESTAMPTZ))
    )


def _numeric_cast(source: TypeCodec, target: TypeCodec, value: bytes, fmt: SessionFormat, column_id: str) -> bytes:
    s, t = source.oid, target.oid
    text = source.to_text(value, fmt)
    if t in INTEGERS:
        if s in INTEGERS:
            return target.canonical_from_text(text, fmt)
        if s in FLOATS:
            f = float(struct.unpack("!d" if s == 701 else "!f", value)[0])
            if math.isnan(f) or math.isinf(f):
                raise NumericOutOfRange(f"pgveil: integer out of range (column {column_id})")
            return target.canonical_from_text(b"%d" % round(f), fmt)  # rint: half to even
        try:
            d = Decimal(text.decode("ascii"))
            rounded = d.quantize(Decimal(1), rounding=ROUND_HALF_UP)
        except (InvalidOperation, ValueError):
            raise NumericOutOfRange(f"pgveil: integer out of range (column {column_id})") from None
        return target.canonical_from_text(str(rounded).encode("ascii"), fmt)
    if t == NUMERIC and s in FLOATS:
        f = float(struct.unpack("!d" if s == 701 else "!f", value)[0])
        if math.isnan(f):
            return target.canonical_from_text(b"NaN", fmt)
        if math.isinf(f):
            return target.canonical_from_text(b"Infinity" if f > 0 else b"-Infinity", fmt)
        return target.canonical_from_text(format(f, ".15g" if s == 701 else ".6g").encode("ascii"), fmt)
    return target.canonical_from_text(text, fmt)


def _strip_offset(text: bytes) -> bytes:
    # ISO output: "YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]" (or "infinity"); BC suffix kept.
    bc = text.endswith(b" BC")
    core = text[:-3] if bc else text
    for i in range(len(core) - 1, 9, -1):
        if core[i : i + 1] in (b"+", b"-"):
            core = core[:i]
            break
    return core + (b" BC" if bc else b"")


def _refuse(cast_type: str, target: TypeCodec, column_id: str) -> CastNotSupported:
    return CastNotSupported(
        f"pgveil: a literal cast to {cast_type} cannot be stored in encrypted column {column_id} "
        f"(declared {target.name})",
        hint=f"write the literal without a cast, or cast it to {target.name}",
    )
