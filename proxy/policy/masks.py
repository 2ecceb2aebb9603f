"""Masking functions by declared type: what a ``masked:<fn>`` (or ``match``) grant serves instead of the value.

A mask works on the canonical bytes of the column's declared type (``proxy.pgtypes``) and returns canonical
bytes of the same type, or None (NULL) where the function has no valid form for the type. The caller encodes
the result with the type's codec in the format the client asked for, so a masked date is still a date and a
masked number still a number, in text and in binary. ``MASK_TABLE`` is the one description of which function
gives what for which type family: the compilers are looked up in it, and the table in ``docs/masks.md`` is
rendered from it (``mask_table_markdown``; a test keeps the two equal).

``compile_mask`` does every per-column step once (codec lookup, typmod, the ``fixed:`` value, the HMAC key
schedule), so the returned function is a few bytes operations per value: it runs once per masked value on the
result path. ``hash`` is HMAC-SHA256 under a keystore key over a domain tag, the column's id (length-prefixed,
so equal values in different columns hash differently) and the canonical value; never a bare digest.

Must not: do I/O, read the session's settings (a mask is a function of the canonical value alone), or put a
value in any message. ``mask_problem`` messages may quote a ``fixed:`` text: it is configuration, not data.
"""

from __future__ import annotations

import hmac
import math
import struct
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from proxy.pgtypes import DEFAULT_FORMAT, PgTypeError, TypeCodec, codec_for
from proxy.pgtypes.bytea import ByteaCodec
from proxy.pgtypes.floating import FloatCodec
from proxy.pgtypes.integer import IntegerCodec
from proxy.pgtypes.jsontypes import JsonbCodec, JsonCodec
from proxy.pgtypes.numeric import NumericCodec
from proxy.pgtypes.scalars import BoolCodec, UuidCodec
from proxy.pgtypes.temporal import (
    DATE_MIN,
    DATE_NOBEGIN,
    DATE_NOEND,
    DT_NOBEGIN,
    DT_NOEND,
    MIN_TIMESTAMP,
    POSTGRES_EPOCH_JDATE,
    USECS_PER_DAY,
    DateCodec,
    TimestampCodec,
    date2j,
    j2date,
)
from proxy.pgtypes.text import TextCodec
from proxy.policy.model import Mask, MaskFunction

Masker = Callable[[bytes], bytes | None]

# HMAC message: TAG || len(context) (4 bytes, big-endian) || context || canonical value. The tag keeps these
# outputs apart from any other HMAC pgveil may compute under the same key.
HASH_TAG = b"pgveil/mask/hash/v1\x00"
_LAST_DIGITS = 10_000  # last4 on numbers: the absolute value's last four integer digits
_STARS = b"****"  # what ``email`` puts in place of the local part


class Family(StrEnum):
    """Declared types grouped by how masks treat them; the value is the docs table's column heading."""

    TEXT = "text"
    INTEGER = "integer"
    NUMERIC = "numeric"
    FLOAT = "float"
    DATETIME = "date/time"
    UUID = "uuid"
    BOOL = "bool"
    JSON = "json"
    BYTEA = "bytea"


FAMILY_TYPES: Mapping[Family, str] = MappingProxyType(
    {
        Family.TEXT: "text, varchar, varchar(n), char(n), bpchar",
        Family.INTEGER: "int2, int4, int8",
        Family.NUMERIC: "numeric, numeric(p,s)",
        Family.FLOAT: "float4, float8",
        Family.DATETIME: "date, timestamp, timestamptz",
        Family.UUID: "uuid",
        Family.BOOL: "bool",
        Family.JSON: "json, jsonb",
        Family.BYTEA: "bytea",
    }
)


def family_of(codec: TypeCodec) -> Family:
    """The family of a codec from ``proxy.pgtypes.codec_for``."""
    if isinstance(codec, TextCodec):
        return Family.TEXT
    if isinstance(codec, IntegerCodec):
        return Family.INTEGER
    if isinstance(codec, NumericCodec):
        return Family.NUMERIC
    if isinstance(codec, FloatCodec):
        return Family.FLOAT
    if isinstance(codec, DateCodec | TimestampCodec):
        return Family.DATETIME
    if isinstance(codec, UuidCodec):
        return Family.UUID
    if isinstance(codec, BoolCodec):
        return Family.BOOL
    if isinstance(codec, JsonCodec | JsonbCodec):
        return Family.JSON
    if isinstance(codec, ByteaCodec):
        return Family.BYTEA
    raise TypeError(f"no mask family for type {codec.name}")  # a codec added without a family here


@dataclass(frozen=True, slots=True)
class _Spec:
    """What ``compile_mask`` knows about one (mask, column): everything a compiler may precompute from."""

    mask: Mask
    codec: TypeCodec
    digest: Callable[[bytes], bytes] | None  # HMAC-SHA256 of a canonical value, for ``hash``


Compiler = Callable[[_Spec], Masker]


@dataclass(frozen=True, slots=True)
class MaskEntry:
    """One cell of the table: ``result`` describes what the function serves for the family (markdown);
    ``compiler`` builds the per-value function, None where the result is always NULL."""

    result: str
    compiler: Compiler | None

    @property
    def always_null(self) -> bool:
        return self.compiler is None


# -- shared ------------------------------------------------------------------------------------------------


def _always_null(value: bytes) -> bytes | None:
    return None


def _fixed_canonical(mask: Mask, codec: TypeCodec) -> bytes:
    """The canonical value of a ``fixed:<text>`` mask; raises PgTypeError when the type cannot hold it."""
    text = mask.text if mask.text is not None else ""
    if isinstance(codec, ByteaCodec):
        return text.encode("utf-8")  # the text's bytes, not bytea input syntax
    # Read as a client would send it in text format, UTF8 and TimeZone UTC (a timestamptz without a zone is UTC).
    return codec.canonical_from_text(text.encode("utf-8", "surrogatepass"), DEFAULT_FORMAT)


def _fixed(spec: _Spec) -> Masker:
    constant = _fixed_canonical(spec.mask, spec.codec)

    def mask_fixed(value: bytes) -> bytes | None:
        return constant

    return mask_fixed


def _digest_of(spec: _Spec) -> Callable[[bytes], bytes]:
    if spec.digest is None:  # compile_mask checks the key before any compiler runs
        raise ValueError("hash needs a key")
    return spec.digest


# -- text, varchar(n), char(n) -------------------------------------------------------------------------------
# Lengths count characters (code points), as PostgreSQL does in a UTF-8 database. char(n) values are blank
# padded in their canonical form; the pad is insignificant in PostgreSQL, so masks see the value without it
# and pad the result again to n.


def _text_shape(codec: TypeCodec) -> tuple[int, bool]:
    assert isinstance(codec, TextCodec)
    return codec.max_chars, codec.pad and codec.max_chars >= 0


def _padder(limit: int, pad: bool) -> Callable[[bytes, int], bytes]:
    def padded(out: bytes, chars: int) -> bytes:
        return out + b" " * (limit - chars) if chars < limit else out

    def unpadded(out: bytes, chars: int) -> bytes:
        return out

    return padded if pad else unpadded


def _text_last4(spec: _Spec) -> Masker:
    limit, pad = _text_shape(spec.codec)
    finish = _padder(limit, pad)

    def mask_last4(value: bytes) -> bytes | None:
        if pad:
            value = value.rstrip(b" ")
        if value.isascii():
            n = len(value)
            out = b"*" * (n - 4) + value[-4:] if n > 4 else b"*" * n
        else:
            text = value.decode("utf-8")
            n = len(text)
            out = b"*" * (n - 4) + text[-4:].encode("utf-8") if n > 4 else b"*" * n
        return finish(out, n)

    return mask_last4


def _text_partial(spec: _Spec) -> Masker:
    limit, pad = _text_shape(spec.codec)
    finish = _padder(limit, pad)

    def mask_partial(value: bytes) -> bytes | None:
        if pad:
            value = value.rstrip(b" ")
        if value.isascii():
            n = len(value)
            out = value[:1] + b"*" * (n - 2) + value[-1:] if n > 2 else b"*" * n
        else:
            text = value.decode("utf-8")
            n = len(text)
            out = (text[0] + "*" * (n - 2) + text[-1]).encode("utf-8") if n > 2 else b"*" * n
        return finish(out, n)

    return mask_partial


def _text_email(spec: _Spec) -> Masker:
    limit, pad = _text_shape(spec.codec)
    finish = _padder(limit, pad)
    no_at = _STARS[:limit] if limit >= 0 else _STARS
    no_at_result = finish(no_at, len(no_at))

    def mask_email(value: bytes) -> bytes | None:
        if pad:
            value = value.rstrip(b" ")
        at = value.rfind(b"@")
        if at < 0:
            return no_at_result
        domain = value[at:]  # "@example.com"
        if limit < 0:
            return _STARS + domain
        chars = len(domain) if domain.isascii() else len(domain.decode("utf-8"))
        stars = min(len(_STARS), limit - chars)  # the value fitted, so "@domain" does: stars >= 0
        return finish(_STARS[:stars] + domain, stars + chars)

    return mask_email


def _text_hash(spec: _Spec) -> Masker:
    limit, pad = _text_shape(spec.codec)
    digest = _digest_of(spec)
    width = 64 if limit < 0 else min(64, limit)
    tail = b" " * (limit - width) if pad else b""

    def mask_hash(value: bytes) -> bytes | None:
        return digest(value).hex().encode("ascii")[:width] + tail

    return mask_hash


# -- int2, int4, int8 ------------------------------------------------------------------------------------------


def _integer_last4(spec: _Spec) -> Masker:
    width = spec.codec.typlen

    def mask_last4(value: bytes) -> bytes | None:
        return (abs(int.from_bytes(value, "big", signed=True)) % _LAST_DIGITS).to_bytes(width, "big", signed=True)

    return mask_last4


def _integer_hash(spec: _Spec) -> Masker:
    width = spec.codec.typlen
    digest = _digest_of(spec)

    def mask_hash(value: bytes) -> bytes | None:
        return digest(value)[:width]  # every bit pattern is a valid value of the type

    return mask_hash


# -- numeric, numeric(p,s) -------------------------------------------------------------------------------------
# The canonical form is numeric's text output ("-12345.670", "NaN", "Infinity"); results are built in it.


def _numeric_last4(spec: _Spec) -> Masker:
    def mask_last4(value: bytes) -> bytes | None:
        if value[-1:] not in b"0123456789":  # NaN, Infinity, -Infinity: no digits to keep
            return None
        whole, _, fraction = value.lstrip(b"-").partition(b".")
        # |trunc(v)| mod 10000 never exceeds |v|, so it fits whatever numeric(p,s) held the value.
        kept = b"%d" % (int(whole[-4:]) if whole else 0)
        return kept + b"." + b"0" * len(fraction) if fraction else kept

    return mask_last4


_MAX_HASH_DIGITS = 18


def _numeric_hash(spec: _Spec) -> Masker:
    codec = spec.codec
    assert isinstance(codec, NumericCodec)
    digest = _digest_of(spec)
    precision = codec.precision if codec.precision >= 0 else _MAX_HASH_DIGITS
    scale = codec.scale if codec.precision >= 0 else 0
    modulus = 10 ** min(precision, _MAX_HASH_DIGITS)

    # k * 10**-scale with 0 <= k < 10**precision: a value of numeric(precision, scale), at its display scale.
    def mask_hash(value: bytes) -> bytes | None:
        k = int.from_bytes(digest(value)[:8], "big") % modulus
        if scale > 0:
            digits = b"%0*d" % (scale + 1, k)
            return digits[:-scale] + b"." + digits[-scale:]
        if scale < 0 and k:
            return b"%d" % k + b"0" * -scale
        return b"%d" % k

    return mask_hash


# -- float4, float8 --------------------------------------------------------------------------------------------


def _float_struct(codec: TypeCodec) -> struct.Struct:
    return struct.Struct(">d" if codec.typlen == 8 else ">f")


def _float_last4(spec: _Spec) -> Masker:
    layout = _float_struct(spec.codec)

    def mask_last4(value: bytes) -> bytes | None:
        number = layout.unpack(value)[0]
        if not math.isfinite(number):
            return None
        # Below 10000 every integer is exact in float4 and float8.
        return layout.pack(float(int(abs(number)) % _LAST_DIGITS))

    return mask_last4


def _float_hash(spec: _Spec) -> Masker:
    layout = _float_struct(spec.codec)
    digest = _digest_of(spec)
    modulus = 1 << (53 if spec.codec.typlen == 8 else 24)  # integers the type holds exactly

    def mask_hash(value: bytes) -> bytes | None:
        return layout.pack(float(int.from_bytes(digest(value)[:8], "big") % modulus))

    return mask_hash


# -- date, timestamp, timestamptz -------------------------------------------------------------------------------


def _year_start(days: int) -> int:
    """Days since 2000-01-01 of January 1st of the year ``days`` falls in; the first valid date (4714-11-24 BC)
    for a date in 4714 BC, whose January 1st is out of PostgreSQL's range."""
    year = j2date(days + POSTGRES_EPOCH_JDATE)[0]
    return max(date2j(year, 1, 1) - POSTGRES_EPOCH_JDATE, DATE_MIN)


_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")


def _datetime_partial(spec: _Spec) -> Masker:
    if isinstance(spec.codec, DateCodec):

        def mask_date(value: bytes) -> bytes | None:
            days = _INT32.unpack(value)[0]
            if days in (DATE_NOBEGIN, DATE_NOEND):
                return value
            return _INT32.pack(_year_start(days))

        return mask_date

    def mask_timestamp(value: bytes) -> bytes | None:
        usecs = _INT64.unpack(value)[0]
        if usecs in (DT_NOBEGIN, DT_NOEND):
            return value
        # timestamptz counts from 2000-01-01 00:00 UTC: the year is the UTC year, the result midnight UTC.
        return _INT64.pack(max(_year_start(usecs // USECS_PER_DAY) * USECS_PER_DAY, MIN_TIMESTAMP))

    return mask_timestamp


# -- uuid, bytea ------------------------------------------------------------------------------------------------


def _uuid_hash(spec: _Spec) -> Masker:
    digest = _digest_of(spec)

    def mask_hash(value: bytes) -> bytes | None:
        out = bytearray(digest(value)[:16])
        out[6] = (out[6] & 0x0F) | 0x80  # version 8 (RFC 9562: application-defined)
        out[8] = (out[8] & 0x3F) | 0x80  # the RFC variant
        return bytes(out)

    return mask_hash


def _bytea_last4(spec: _Spec) -> Masker:
    def mask_last4(value: bytes) -> bytes | None:
        return value[-4:] if len(value) > 4 else b""

    return mask_last4


def _bytea_hash(spec: _Spec) -> Masker:
    digest = _digest_of(spec)

    def mask_hash(value: bytes) -> bytes | None:
        return digest(value)

    return mask_hash


# -- the table --------------------------------------------------------------------------------------------------

_F = MaskFunction
_CELLS: dict[tuple[MaskFunction, Family], MaskEntry] = {
    (_F.LAST4, Family.TEXT): MaskEntry("`*` for all but the last 4 characters (4 or fewer: all `*`)", _text_last4),
    (_F.LAST4, Family.INTEGER): MaskEntry("last 4 digits of the absolute value (`-1234567` → `4567`)", _integer_last4),
    (_F.LAST4, Family.NUMERIC): MaskEntry(
        "last 4 integer digits of the absolute value, fraction zeroed (`-12345.67` → `2345.00`); NaN, Infinity: NULL",
        _numeric_last4,
    ),
    (_F.LAST4, Family.FLOAT): MaskEntry(
        "last 4 integer digits of the absolute value (`12345.6` → `2345`); NaN, Infinity: NULL", _float_last4
    ),
    (_F.LAST4, Family.BYTEA): MaskEntry("the last 4 bytes (4 or fewer: empty)", _bytea_last4),
    (_F.EMAIL, Family.TEXT): MaskEntry(
        "`****` and the part from the last `@` (`ann@example.com` → `****@example.com`); no `@`: `****`",
        _text_email,
    ),
    (_F.PARTIAL, Family.TEXT): MaskEntry("first and last character, `*` between (2 or fewer: all `*`)", _text_partial),
    (_F.PARTIAL, Family.DATETIME): MaskEntry(
        "January 1st of the year, midnight (timestamptz: of the UTC year, midnight UTC)", _datetime_partial
    ),
    (_F.HASH, Family.TEXT): MaskEntry("64 hex digits of the HMAC, cut to n for varchar(n), char(n)", _text_hash),
    (_F.HASH, Family.INTEGER): MaskEntry("an integer from the HMAC, anywhere in the type's range", _integer_hash),
    (_F.HASH, Family.NUMERIC): MaskEntry(
        "a non-negative value from the HMAC that fits numeric(p,s) (numeric: an integer below 10^18)",
        _numeric_hash,
    ),
    (_F.HASH, Family.FLOAT): MaskEntry(
        "a non-negative integer from the HMAC, below 2^24 (float4) or 2^53 (float8)", _float_hash
    ),
    (_F.HASH, Family.UUID): MaskEntry("a version-8 uuid from the HMAC", _uuid_hash),
    (_F.HASH, Family.BYTEA): MaskEntry("the 32 bytes of the HMAC", _bytea_hash),
    **{(_F.FIXED, family): MaskEntry("the text, read as a value of the type", _fixed) for family in Family},
    (_F.FIXED, Family.BYTEA): MaskEntry("the text's UTF-8 bytes", _fixed),
}
_NULL = MaskEntry("NULL", None)

MASK_TABLE: Mapping[tuple[MaskFunction, Family], MaskEntry] = MappingProxyType(
    {(function, family): _CELLS.get((function, family), _NULL) for function in MaskFunction for family in Family}
)


def mask_table_markdown() -> str:
    """The table of ``docs/masks.md`` (a row per type family, a column per function), from ``MASK_TABLE``."""
    functions = list(MaskFunction)
    headings = ["`fixed:<text>`" if f is MaskFunction.FIXED else f"`{f.value}`" for f in functions]
    lines = ["| declared type | " + " | ".join(headings) + " |", "|---" * (len(functions) + 1) + "|"]
    for family in Family:
        cells = [MASK_TABLE[(function, family)].result for function in functions]
        lines.append(f"| {FAMILY_TYPES[family]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- the API ----------------------------------------------------------------------------------------------------


def _codec_or_problem(declared_type: str) -> TypeCodec | str:
    try:
        return codec_for(declared_type)
    except PgTypeError as exc:
        return exc.message


def mask_problem(mask: Mask, declared_type: str) -> str | None:
    """Why ``mask`` cannot be configured for a column of ``declared_type``, or None if it can.

    A function that has no valid form for the type is not a problem: it serves NULL (see ``MASK_TABLE``).
    Problems are an unknown type, a ``fixed`` mask without its text (or another function with one), and a
    ``fixed:`` text that is not a valid value of the type."""
    codec = _codec_or_problem(declared_type)
    if isinstance(codec, str):
        return codec
    if mask.function is MaskFunction.FIXED:
        if mask.text is None:
            return "mask fixed needs a text (fixed:<text>)"
        try:
            _fixed_canonical(mask, codec)
        except PgTypeError as exc:
            return f"fixed text '{mask.text}' is not a valid {codec.name}: {exc.message}"
        except UnicodeEncodeError:
            return f"fixed text '{mask.text}' is not valid UTF-8"
    elif mask.text is not None:
        return f"mask {mask.function} takes no text"
    return None


def mask_entry(mask: Mask, declared_type: str) -> MaskEntry:
    """The table cell for ``mask`` on ``declared_type``: ``result`` says what a role gets (for ``policy explain``),
    ``always_null`` whether every value comes back NULL (a result path may then skip decrypting). Raises
    PgTypeError (42704) for an unknown type."""
    return MASK_TABLE[(mask.function, family_of(codec_for(declared_type)))]


def _hmac_digest(hash_key: bytes, context: bytes) -> Callable[[bytes], bytes]:
    base = hmac.new(hash_key, HASH_TAG + len(context).to_bytes(4, "big") + context, "sha256")

    def digest(value: bytes) -> bytes:
        h = base.copy()
        h.update(value)
        return h.digest()

    return digest


# The native forms of compiled masks (see ``native_form``): the accelerator's kernel (native/pgveil_accel.c)
# applies these itself, byte for byte as the Python functions do.
NATIVE_PARTIAL = 1
NATIVE_LAST4 = 2
NATIVE_EMAIL = 3
NATIVE_FIXED = 4
NATIVE_NULL = 5
_NATIVE_FORMS: weakref.WeakKeyDictionary[Masker, tuple[int, bytes]] = weakref.WeakKeyDictionary()
_NATIVE_FORMS[_always_null] = (NATIVE_NULL, b"")


def native_form(masker: Masker) -> tuple[int, bytes] | None:
    """(code, the ``fixed:`` value's canonical bytes or b"") of a function from ``compile_mask`` whose
    output the accelerator computes itself, or None where only the function knows it: ``partial`` and
    ``last4`` on text and varchar(n), ``email`` on text, ``fixed`` on the text types, and every
    always-NULL mask."""
    return _NATIVE_FORMS.get(masker)


def _native_code(function: MaskFunction, codec: TypeCodec) -> int | None:
    if not isinstance(codec, TextCodec) or codec.pad:
        return None  # char(n) pads its results: left to the functions
    if function is MaskFunction.PARTIAL:
        return NATIVE_PARTIAL
    if function is MaskFunction.LAST4:
        return NATIVE_LAST4
    if function is MaskFunction.EMAIL and codec.max_chars < 0:
        return NATIVE_EMAIL  # varchar(n) cuts the stars to fit n: left to the function
    if function is MaskFunction.FIXED:
        return NATIVE_FIXED
    return None


def compile_mask(mask: Mask, declared_type: str, hash_key: bytes | None, context: bytes = b"") -> Masker:
    """The per-value function of ``mask`` on a column of ``declared_type``: canonical bytes in, canonical bytes
    of the same type (or None for NULL) out. ``context`` is the column's id (``b"public.customers.ssn"``),
    part of what ``hash`` authenticates. Raises ValueError for a mask ``mask_problem`` refuses, and for
    ``hash`` without a (non-empty) key, whatever the type."""
    problem = mask_problem(mask, declared_type)
    if problem is not None:
        raise ValueError(problem)
    digest: Callable[[bytes], bytes] | None = None
    if mask.function is MaskFunction.HASH:
        if not hash_key:
            raise ValueError("mask hash needs a key")
        digest = _hmac_digest(hash_key, context)
    codec = codec_for(declared_type)
    entry = MASK_TABLE[(mask.function, family_of(codec))]
    if entry.compiler is None:
        return _always_null
    masker = entry.compiler(_Spec(mask, codec, digest))
    code = _native_code(mask.function, codec)
    if code is not None:
        _NATIVE_FORMS[masker] = (code, _fixed_canonical(mask, codec) if code == NATIVE_FIXED else b"")
    return masker
