"""Masking functions by declared type (proxy/policy/masks.py): each function on each type family, the
validity of every output for its type (text and binary, typmods), the keyed hash, config problems, and the
docs table rendered from the same table the compilers come from."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st

from proxy.pgtypes import DEFAULT_FORMAT, NumericValueOutOfRange, SessionFormat, codec_for
from proxy.pgtypes.temporal import DATE_END, DATE_MIN, END_TIMESTAMP, MIN_TIMESTAMP
from proxy.pgtypes.text import TextCodec
from proxy.policy.masks import (
    HASH_TAG,
    MASK_TABLE,
    Family,
    Masker,
    compile_mask,
    family_of,
    mask_entry,
    mask_problem,
    mask_table_markdown,
)
from proxy.policy.model import Mask, MaskFunction

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONTEXT = b"public.customers.ssn"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "masks.md"


def mask(declared: str, function: MaskFunction, text: str | None = None, context: bytes = CONTEXT) -> Masker:
    return compile_mask(Mask(function, text), declared, KEY, context)


def apply(declared: str, function: MaskFunction, value: str, text: str | None = None) -> str | None:
    """Mask one value given (and returned) as PostgreSQL text output."""
    codec = codec_for(declared)
    out = compile_mask(Mask(function, text), declared, KEY, CONTEXT)(
        codec.canonical_from_text(value.encode(), DEFAULT_FORMAT)
    )
    return None if out is None else codec.to_text(out, DEFAULT_FORMAT).decode()


def expected_hmac(value: bytes, key: bytes = KEY, context: bytes = CONTEXT) -> bytes:
    message = HASH_TAG + len(context).to_bytes(4, "big") + context + value
    return hmac.new(key, message, hashlib.sha256).digest()


# -- text ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "value", "expected"),
    [
        ("text", "123-45-6789", "*******6789"),
        ("text", "12345", "*2345"),
        ("text", "1234", "****"),
        ("text", "", ""),
        ("text", "Zoë Ångström", "********tröm"),
        ("varchar(11)", "123-45-6789", "*******6789"),
        ("char(8)", "abcdef", "**cdef  "),
        ("char(3)", "ab", "**"),  # char(3) holds 'ab ': the pad is not part of the value
    ],
)
def test_last4_on_text(declared: str, value: str, expected: str) -> None:
    out = apply(declared, MaskFunction.LAST4, value)
    codec = codec_for(declared)
    assert isinstance(codec, TextCodec)
    assert out == (expected.ljust(codec.max_chars) if codec.pad else expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Johnson", "J*****n"),
        ("abc", "a*c"),
        ("ab", "**"),
        ("a", "*"),
        ("", ""),
        ("Ålø", "Å*ø"),
        ("日本語の", "日**の"),
    ],
)
def test_partial_on_text(value: str, expected: str) -> None:
    assert apply("text", MaskFunction.PARTIAL, value) == expected
    assert apply("varchar(10)", MaskFunction.PARTIAL, value) == expected
    assert apply("char(10)", MaskFunction.PARTIAL, value) == expected.ljust(10)


@pytest.mark.parametrize(
    ("declared", "value", "expected"),
    [
        ("text", "ann@example.com", "****@example.com"),
        ("text", "a@b.c", "****@b.c"),
        ("text", '"odd@local"@example.org', "****@example.org"),  # the last @ starts the domain
        ("text", "not an address", "****"),
        ("text", "", "****"),
        ("text", "jürgen@bücher.de", "****@bücher.de"),
        ("varchar(8)", "ab@cd.ef", "**@cd.ef"),  # the stars shrink to fit the column's length
        ("varchar(6)", "@cd.ef", "@cd.ef"),
        ("varchar(2)", "xy", "**"),
        ("char(20)", "ann@example.com", "****@example.com    "),
        ("char(2)", "x", "**"),
    ],
)
def test_email_on_text(declared: str, value: str, expected: str) -> None:
    assert apply(declared, MaskFunction.EMAIL, value) == expected


@pytest.mark.parametrize(
    ("declared", "width", "padded"),
    [("text", 64, 64), ("varchar(10)", 10, 10), ("varchar(100)", 64, 64), ("char(6)", 6, 6), ("char(70)", 64, 70)],
)
def test_hash_on_text_is_the_hex_hmac_cut_to_the_length(declared: str, width: int, padded: int) -> None:
    codec = codec_for(declared)
    canonical = codec.canonical_from_text(b"12345", DEFAULT_FORMAT)
    out = mask(declared, MaskFunction.HASH)(canonical)
    assert out == expected_hmac(canonical).hex().encode()[:width].ljust(padded)


def test_fixed_and_null_on_text() -> None:
    assert apply("text", MaskFunction.FIXED, "secret", "REDACTED") == "REDACTED"
    assert apply("char(5)", MaskFunction.FIXED, "hush", "n/a") == "n/a  "
    assert apply("varchar(3)", MaskFunction.FIXED, "abc", "n/a   ") == "n/a"  # trailing spaces cut, as PostgreSQL does
    assert apply("text", MaskFunction.NULL, "secret") is None


# -- numbers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "value", "expected"),
    [
        ("int4", "-1234567", "4567"),
        ("int4", "1234567", "4567"),
        ("int4", "42", "42"),
        ("int4", "-2147483648", "3648"),
        ("int2", "-32768", "2768"),
        ("int8", "9223372036854775807", "5807"),
        ("numeric", "-12345.678", "2345.000"),
        ("numeric", "1e30", "0"),
        ("numeric", "0.0042", "0.0000"),
        ("numeric(10,2)", "98765.43", "8765.00"),
        ("numeric(5,-2)", "1234567", "4600"),
        ("numeric(3,5)", "0.00123", "0.00000"),
        ("numeric", "NaN", None),
        ("numeric", "Infinity", None),
        ("numeric", "-Infinity", None),
        ("float8", "-12345.75", "2345"),
        ("float8", "1e20", "0"),
        ("float4", "123.5", "123"),
        ("float8", "NaN", None),
        ("float4", "-Infinity", None),
    ],
)
def test_last4_on_numbers(declared: str, value: str, expected: str | None) -> None:
    assert apply(declared, MaskFunction.LAST4, value) == expected


@pytest.mark.parametrize("declared", ["int2", "int4", "int8"])
def test_hash_on_integers_is_the_hmac_prefix(declared: str) -> None:
    codec = codec_for(declared)
    canonical = codec.canonical_from_text(b"77", DEFAULT_FORMAT)
    assert mask(declared, MaskFunction.HASH)(canonical) == expected_hmac(canonical)[: codec.typlen]


@pytest.mark.parametrize(
    ("declared", "values", "pattern"),
    [
        ("numeric", ["0", "1", "-1", "0.5"], r"\d{1,18}"),
        ("numeric(10,2)", ["0", "1", "-1", "0.5"], r"\d{1,8}\.\d\d"),
        ("numeric(3,5)", ["0", "0.001", "-0.001", "0.00999"], r"0\.00\d\d\d"),
        ("numeric(4,-2)", ["0", "100", "-100", "999900"], r"0|\d{1,4}00"),
    ],
)
def test_hash_on_numeric_fits_the_typmod(declared: str, values: list[str], pattern: str) -> None:
    outs = {apply(declared, MaskFunction.HASH, v) for v in values}
    assert len(outs) == len(values)  # distinct inputs, distinct outputs (for this key: the hash is deterministic)
    for out in outs:
        assert out is not None
        assert re.fullmatch(pattern, out), out


@pytest.mark.parametrize(("declared", "bound"), [("float4", 2**24), ("float8", 2**53)])
def test_hash_on_floats_is_an_exact_integer(declared: str, bound: int) -> None:
    out = apply(declared, MaskFunction.HASH, "3.25")
    assert out is not None
    number = float(out)
    assert number == int(number)
    assert 0 <= number < bound


@pytest.mark.parametrize("function", [MaskFunction.EMAIL, MaskFunction.PARTIAL, MaskFunction.NULL])
@pytest.mark.parametrize("declared", ["int2", "int4", "int8", "numeric", "numeric(10,2)", "float4", "float8"])
def test_text_shaped_masks_on_numbers_are_null(declared: str, function: MaskFunction) -> None:
    assert apply(declared, function, "12345") is None


def test_fixed_on_numbers_is_parsed() -> None:
    assert apply("int4", MaskFunction.FIXED, "5", " -0017 ") == "-17"
    assert apply("numeric(10,2)", MaskFunction.FIXED, "5", "1.005") == "1.01"
    assert apply("float8", MaskFunction.FIXED, "5", "0") == "0"


# -- dates, uuid, bool, json, bytea ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "value", "expected"),
    [
        ("date", "2021-07-04", "2021-01-01"),
        ("date", "2021-01-01", "2021-01-01"),
        ("date", "0044-03-15 BC", "0044-01-01 BC"),
        ("date", "4714-12-01 BC", "4714-11-24 BC"),  # January 1st of 4714 BC is before PostgreSQL's first date
        ("date", "infinity", "infinity"),
        ("date", "-infinity", "-infinity"),
        ("timestamp", "1999-12-31 23:59:59.999999", "1999-01-01 00:00:00"),
        ("timestamp", "4714-11-30 12:00 BC", "4714-11-24 00:00:00 BC"),
        ("timestamptz", "2021-07-04 12:00:00+05", "2021-01-01 00:00:00+00"),
        ("timestamptz", "2021-01-01 03:00:00+05", "2020-01-01 00:00:00+00"),  # 2020-12-31 22:00 UTC
        ("timestamptz", "infinity", "infinity"),
    ],
)
def test_partial_on_dates_keeps_the_year(declared: str, value: str, expected: str) -> None:
    assert apply(declared, MaskFunction.PARTIAL, value) == expected


def test_masks_on_dates() -> None:
    for declared in ("date", "timestamp", "timestamptz"):
        for function in (MaskFunction.LAST4, MaskFunction.EMAIL, MaskFunction.HASH, MaskFunction.NULL):
            assert apply(declared, function, "2021-07-04") is None
    assert apply("timestamptz", MaskFunction.FIXED, "2021-07-04", "1970-01-01 00:00") == "1970-01-01 00:00:00+00"
    assert apply("date", MaskFunction.FIXED, "2021-07-04", "epoch") == "1970-01-01"


def test_hash_on_uuid_is_a_version_8_uuid_from_the_hmac() -> None:
    value = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    out = apply("uuid", MaskFunction.HASH, str(value))
    assert out is not None
    masked = uuid.UUID(out)
    assert masked.version == 8
    assert masked.variant == uuid.RFC_4122
    expected = bytearray(expected_hmac(value.bytes)[:16])
    expected[6] = 0x80 | expected[6] & 0x0F  # all but the version and variant bits are the HMAC's
    expected[8] = 0x80 | expected[8] & 0x3F
    assert masked.bytes == bytes(expected)
    for function in (MaskFunction.LAST4, MaskFunction.EMAIL, MaskFunction.PARTIAL, MaskFunction.NULL):
        assert apply("uuid", function, str(value)) is None


@pytest.mark.parametrize(
    ("declared", "value", "fixed"),
    [("bool", "t", "false"), ("json", '{"a": 1}', '{"redacted":true}'), ("jsonb", '{"a": 1}', '{"b":2, "a":1}')],
)
def test_bool_and_json_have_only_fixed(declared: str, value: str, fixed: str) -> None:
    codec = codec_for(declared)
    expected = codec.to_text(codec.canonical_from_text(fixed.encode(), DEFAULT_FORMAT), DEFAULT_FORMAT).decode()
    assert apply(declared, MaskFunction.FIXED, value, fixed) == expected
    for function in (
        MaskFunction.LAST4,
        MaskFunction.EMAIL,
        MaskFunction.PARTIAL,
        MaskFunction.HASH,
        MaskFunction.NULL,
    ):
        assert apply(declared, function, value) is None


def test_bytea() -> None:
    last4 = mask("bytea", MaskFunction.LAST4)
    assert last4(b"\x01\x02\x03\x04\x05\x06") == b"\x03\x04\x05\x06"
    assert last4(b"\x01\x02\x03\x04") == b""
    assert mask("bytea", MaskFunction.HASH)(b"\x00\xff") == expected_hmac(b"\x00\xff")
    assert mask("bytea", MaskFunction.FIXED, "\\x00 é")(b"\x01") == "\\x00 é".encode()
    for function in (MaskFunction.EMAIL, MaskFunction.PARTIAL, MaskFunction.NULL):
        assert mask("bytea", function)(b"\x01") is None


# -- the keyed hash -------------------------------------------------------------------------------------------


@given(st.binary(max_size=64), st.binary(max_size=40), st.binary(min_size=1, max_size=40))
def test_hash_is_deterministic_per_key_context_and_value(value: bytes, first: bytes, second: bytes) -> None:
    assume(first != second)
    hashed = compile_mask(Mask(MaskFunction.HASH), "bytea", KEY, first)
    assert hashed(value) == compile_mask(Mask(MaskFunction.HASH), "bytea", KEY, first)(value)
    assert hashed(value) != compile_mask(Mask(MaskFunction.HASH), "bytea", KEY, second)(value)
    assert hashed(value) != compile_mask(Mask(MaskFunction.HASH), "bytea", OTHER_KEY, first)(value)
    assert hashed(value) != hashlib.sha256(value).digest()  # never a bare digest
    assert hashed(value) != hashed(value + b"\x00")


def test_context_is_length_prefixed() -> None:
    # Without the length prefix, context b"ab" + value b"c" and context b"a" + value b"bc" would collide.
    assert compile_mask(Mask(MaskFunction.HASH), "text", KEY, b"ab")(b"c") != compile_mask(
        Mask(MaskFunction.HASH), "text", KEY, b"a"
    )(b"bc")


@pytest.mark.parametrize("declared", ["text", "int4", "date", "bool"])
@pytest.mark.parametrize("key", [None, b""])
def test_hash_without_a_key_is_refused_at_compile_time(declared: str, key: bytes | None) -> None:
    with pytest.raises(ValueError, match="key"):
        compile_mask(Mask(MaskFunction.HASH), declared, key, CONTEXT)


def test_other_masks_need_no_key() -> None:
    assert compile_mask(Mask(MaskFunction.LAST4), "text", None)(b"123456") == b"**3456"


# -- configuration problems ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "text", "declared", "problem"),
    [
        (MaskFunction.FIXED, "abc", "int4", "fixed text 'abc' is not a valid int4: invalid input syntax"),
        (MaskFunction.FIXED, "99999", "int2", "fixed text '99999' is not a valid int2: value is out of range"),
        (MaskFunction.FIXED, "toolong", "varchar(3)", "fixed text 'toolong' is not a valid varchar(3): value too long"),
        (MaskFunction.FIXED, "toolong", "char(3)", "is not a valid char(3)"),
        (MaskFunction.FIXED, "123.456", "numeric(4,2)", "is not a valid numeric(4,2): numeric field overflow"),
        (MaskFunction.FIXED, "2021-02-30", "date", "is not a valid date"),
        (MaskFunction.FIXED, "now", "timestamptz", "is not a valid timestamptz"),
        (MaskFunction.FIXED, "{", "jsonb", "is not a valid jsonb"),
        (MaskFunction.FIXED, "maybe", "bool", "is not a valid bool"),
        (MaskFunction.FIXED, "a\x00b", "text", "is not a valid text"),
        (MaskFunction.FIXED, None, "text", "needs a text"),
        (MaskFunction.LAST4, "x", "text", "takes no text"),
        (MaskFunction.LAST4, None, "geometry", 'type "geometry"'),
    ],
)
def test_mask_problem(function: MaskFunction, text: str | None, declared: str, problem: str) -> None:
    found = mask_problem(Mask(function, text), declared)
    assert found is not None
    assert problem in found
    with pytest.raises(ValueError, match=re.escape(problem)):
        compile_mask(Mask(function, text), declared, KEY)


@pytest.mark.parametrize("function", list(MaskFunction))
@pytest.mark.parametrize("declared", ["text", "int4", "numeric(10,2)", "date", "uuid", "bool", "jsonb", "bytea"])
def test_null_results_are_not_problems(function: MaskFunction, declared: str) -> None:
    text = {
        "int4": "0",
        "numeric(10,2)": "0",
        "date": "2000-01-01",
        "uuid": str(uuid.UUID(int=0)),
        "bool": "f",
        "jsonb": "null",
    }.get(declared, "x")
    assert mask_problem(Mask(function, text if function is MaskFunction.FIXED else None), declared) is None


# -- every output is a valid value of the type -----------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
ASCII_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=10,
)
NUMERIC_TEXT = st.builds(
    lambda sign, digits, cut, exponent: f"{sign}{digits[:cut]}.{digits[cut:]}e{exponent}",
    st.sampled_from(["", "-"]),
    st.text("0123456789", min_size=1, max_size=25),
    st.integers(0, 25),
    st.integers(-30, 30),
) | st.sampled_from(["NaN", "Infinity", "-Infinity", "0", "-0.000"])


def _ints(bits: int) -> st.SearchStrategy[str]:
    return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1).map(str)


def _dates() -> st.SearchStrategy[str]:
    # ISO text for the common years, and every valid day (BC and far future) through its text output.
    days = st.integers(DATE_MIN, DATE_END - 1).map(
        lambda d: codec_for("date").to_text(struct.pack(">i", d), DEFAULT_FORMAT).decode()
    )
    return st.dates().map(str) | days | st.sampled_from(["infinity", "-infinity", "epoch"])


def _timestamps(with_zone: bool) -> st.SearchStrategy[str]:
    codec = codec_for("timestamptz" if with_zone else "timestamp")
    usecs = st.integers(MIN_TIMESTAMP, END_TIMESTAMP - 1).map(
        lambda u: codec.to_text(struct.pack(">q", u), DEFAULT_FORMAT).decode()
    )
    offsets = st.sampled_from(["", "+05:30", "-08", "Z", " America/New_York"]) if with_zone else st.just("")
    wall = st.builds(lambda d, o: d.isoformat(sep=" ") + o, st.datetimes(), offsets)
    return wall | usecs | st.sampled_from(["infinity", "-infinity"])


def _json() -> st.SearchStrategy[str]:
    return JSON_VALUES.map(json.dumps)


VALUES: dict[str, st.SearchStrategy[str]] = {
    "text": TEXT,
    "varchar": TEXT,
    "bpchar": TEXT,
    "varchar(1)": TEXT.filter(lambda v: len(v) <= 1),
    "varchar(6)": TEXT.filter(lambda v: len(v) <= 6),
    "varchar(20)": TEXT.filter(lambda v: len(v) <= 20) | st.emails().filter(lambda v: len(v) <= 20),
    "char(1)": ASCII_TEXT.filter(lambda v: len(v) <= 1),
    "char(5)": TEXT.filter(lambda v: len(v.rstrip(" ")) <= 5),
    "char(80)": TEXT | st.emails().filter(lambda v: len(v) <= 80),
    "int2": _ints(16),
    "int4": _ints(32),
    "int8": _ints(64),
    "numeric": NUMERIC_TEXT,
    "numeric(10,2)": NUMERIC_TEXT,
    "numeric(3,5)": NUMERIC_TEXT,
    "numeric(5,-2)": NUMERIC_TEXT,
    "numeric(30,0)": NUMERIC_TEXT,
    "float4": st.floats(width=32).map(repr),
    "float8": st.floats(width=64).map(repr),
    "date": _dates(),
    "timestamp": _timestamps(False),
    "timestamptz": _timestamps(True),
    "uuid": st.uuids().map(str),
    "bool": st.sampled_from(["t", "f", "yes", "off"]),
    "json": _json(),
    "jsonb": _json(),
    "bytea": st.binary(max_size=40).map(lambda b: "\\x" + b.hex()),
}
FIXED_TEXT = {
    "varchar(1)": "-",
    "char(1)": "-",
    "int2": "-1",
    "int4": "0",
    "int8": "9223372036854775807",
    "numeric": "NaN",
    "numeric(10,2)": "-0.5",
    "numeric(30,0)": "1e29",
    "numeric(3,5)": "0.001",
    "numeric(5,-2)": "-1250",
    "float4": "-0",
    "float8": "1e-300",
    "date": "2000-02-29",
    "timestamp": "1970-01-01 00:00",
    "timestamptz": "2000-01-01 00:00+01",
    "uuid": "00000000-0000-0000-0000-000000000000",
    "bool": "true",
    "json": ' {"x": [1, 2]} ',
    "jsonb": '{"x": [1.50, 2]}',
}
FORMATS = st.sampled_from(
    [
        DEFAULT_FORMAT,
        SessionFormat(timezone="America/New_York"),
        SessionFormat(timezone="Asia/Kolkata", bytea_output="escape"),
    ]
)
MASKS = st.sampled_from([f for f in MaskFunction if f is not MaskFunction.FIXED]).map(Mask) | st.just(None)


def _non_finite(declared: str, canonical: bytes) -> bool:
    family = family_of(codec_for(declared))
    if family is Family.NUMERIC:
        return canonical in (b"NaN", b"Infinity", b"-Infinity")
    if family is Family.FLOAT:
        return not math.isfinite(struct.unpack(">d" if len(canonical) == 8 else ">f", canonical)[0])
    return False


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from(sorted(VALUES)), MASKS, FORMATS, st.binary(max_size=24))
def test_every_output_is_a_valid_value_of_the_declared_type(
    data: st.DataObject, declared: str, chosen: Mask | None, fmt: SessionFormat, context: bytes
) -> None:
    codec = codec_for(declared)
    text = data.draw(VALUES[declared], label="value")
    try:
        canonical = codec.canonical_from_text(text.encode(), DEFAULT_FORMAT)
    except NumericValueOutOfRange:
        reject()  # a random number too large for numeric(p,s)
    the_mask = chosen if chosen is not None else Mask(MaskFunction.FIXED, FIXED_TEXT.get(declared, "n/a"))
    masker = compile_mask(the_mask, declared, KEY, context)
    out = masker(canonical)
    entry = MASK_TABLE[(the_mask.function, family_of(codec))]
    if entry.always_null:
        assert out is None
        return
    if out is None:
        # The only documented NULLs of a value-producing function: last4 of NaN and the infinities.
        assert the_mask.function is MaskFunction.LAST4
        assert _non_finite(declared, canonical)
        return
    # A canonical value of the type: it survives both wire formats unchanged ...
    assert codec.canonical_from_text(codec.to_text(out, fmt), fmt) == out
    assert codec.canonical_from_binary(codec.to_binary(out, fmt), fmt) == out
    # ... and fits the typmod (the codecs apply it on input, so the round trip checks numeric(p,s); text here).
    if isinstance(codec, TextCodec) and codec.max_chars >= 0:
        chars = len(out.decode("utf-8"))
        assert chars == codec.max_chars if codec.pad else chars <= codec.max_chars
    assert masker(canonical) == out  # deterministic


@settings(max_examples=300, deadline=None)
@given(TEXT, st.sampled_from(["text", "varchar(40)", "char(40)"]))
def test_text_masks_reveal_only_what_they_say(value: str, declared: str) -> None:
    codec = codec_for(declared)
    canonical = codec.canonical_from_text(value.encode(), DEFAULT_FORMAT)
    trimmed = canonical.decode().rstrip(" ") if declared.startswith("char") else canonical.decode()

    def run(function: MaskFunction) -> str:
        out = compile_mask(Mask(function), declared, KEY)(canonical)
        assert out is not None
        # A char(n) result is padded; what it shows never ends in a space (see the expectations below).
        return out.decode().rstrip(" ") if declared.startswith("char") else out.decode()

    n = len(trimmed)
    last4 = run(MaskFunction.LAST4)
    assert last4 == ("*" * (n - 4) + trimmed[-4:] if n > 4 else "*" * n)
    partial = run(MaskFunction.PARTIAL)
    assert partial == (trimmed[0] + "*" * (n - 2) + trimmed[-1] if n > 2 else "*" * n)
    email = run(MaskFunction.EMAIL)
    _local, at, domain = trimmed.rpartition("@")
    assert email == ("****" + at + domain if at else "****")


# -- the table and its docs ---------------------------------------------------------------------------------


def test_the_table_covers_every_function_and_family() -> None:
    assert set(MASK_TABLE) == {(f, fam) for f in MaskFunction for fam in Family}
    for family in Family:
        assert MASK_TABLE[(MaskFunction.NULL, family)].always_null
        assert not MASK_TABLE[(MaskFunction.FIXED, family)].always_null
    for entry in MASK_TABLE.values():
        assert (entry.result == "NULL") == entry.always_null


def test_every_supported_type_has_a_family() -> None:
    for declared in VALUES:
        family_of(codec_for(declared))


def test_docs_contain_the_rendered_table() -> None:
    table = mask_table_markdown()
    assert table.count("\n") == len(Family) + 2
    assert table in DOCS.read_text(encoding="utf-8")


def test_a_copy_of_the_table_elsewhere_is_the_current_one() -> None:
    # The README may carry the table too; wherever its heading appears, the whole current table follows it.
    table = mask_table_markdown()
    heading = table.splitlines()[0]
    for path in (DOCS, DOCS.parents[1] / "README.md"):
        text = path.read_text(encoding="utf-8")
        assert text.count(heading) == text.count(table), path


def test_mask_entry_describes_the_compiled_mask() -> None:
    assert mask_entry(Mask(MaskFunction.EMAIL), "date").always_null
    assert compile_mask(Mask(MaskFunction.EMAIL), "date", None)(b"\x00\x00\x00\x00") is None
    entry = mask_entry(Mask(MaskFunction.PARTIAL), "timestamptz")
    assert not entry.always_null
    assert "January 1st" in entry.result
