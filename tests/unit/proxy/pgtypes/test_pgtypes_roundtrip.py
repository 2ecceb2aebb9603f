"""Property tests: every canonical value survives both wire formats, and both formats agree."""

from __future__ import annotations

import json
import math
import struct
import uuid
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pgtypes import DEFAULT_FORMAT, NumericValueOutOfRange, SessionFormat, TypeCodec, codec_for
from proxy.pgtypes.temporal import DATE_END, DATE_MIN, END_TIMESTAMP, MIN_TIMESTAMP

FORMATS = st.sampled_from(
    [
        DEFAULT_FORMAT,
        SessionFormat(timezone="America/New_York"),
        SessionFormat(timezone="Asia/Kolkata", datestyle="ISO, DMY"),
        SessionFormat(timezone="Australia/Lord_Howe"),
        SessionFormat(timezone="<-03>+03"),
        SessionFormat(bytea_output="escape"),
    ]
)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))


def _check(codec: TypeCodec, canonical: bytes, fmt: SessionFormat) -> None:
    text, binary = codec.to_text(canonical, fmt), codec.to_binary(canonical, fmt)
    assert codec.canonical_from_binary(binary, fmt) == canonical
    assert codec.canonical_from_text(text, fmt) == canonical


def _ints(width: int) -> st.SearchStrategy[bytes]:
    bound = 1 << (width * 8 - 1)
    return st.integers(-bound, bound - 1).map(lambda v: v.to_bytes(width, "big", signed=True))


@settings(deadline=None)
@given(_ints(2), _ints(4), _ints(8), FORMATS)
def test_integers(c2: bytes, c4: bytes, c8: bytes, fmt: SessionFormat) -> None:
    _check(codec_for("int2"), c2, fmt)
    _check(codec_for("int4"), c4, fmt)
    _check(codec_for("int8"), c8, fmt)


@settings(deadline=None)
@given(st.floats(width=64), st.floats(width=32), FORMATS)
def test_floats(f8: float, f4: float, fmt: SessionFormat) -> None:
    float8, float4 = codec_for("float8"), codec_for("float4")
    _check(float8, float8.canonical_from_binary(struct.pack(">d", f8)), fmt)
    _check(float4, float4.canonical_from_binary(struct.pack(">f", f4)), fmt)
    if not math.isnan(f8):
        assert struct.unpack(">d", float8.canonical_from_text(repr(f8).encode(), fmt))[0] == f8


NUMERIC_TEXT = st.builds(
    lambda sign, digits, cut, exponent: f"{sign}{digits[:cut]}.{digits[cut:]}e{exponent}",
    st.sampled_from(["", "-", "+"]),
    st.text("0123456789", min_size=1, max_size=40),
    st.integers(0, 40),
    st.integers(-50, 50),
) | st.sampled_from(["NaN", "Infinity", "-Infinity", "0", "-0.000"])


@settings(deadline=None)
@given(NUMERIC_TEXT, FORMATS)
def test_numeric(text: str, fmt: SessionFormat) -> None:
    codec = codec_for("numeric")
    canonical = codec.canonical_from_text(text.encode(), fmt)
    _check(codec, canonical, fmt)
    bounded = codec_for("numeric(30,6)")
    try:
        rounded = bounded.canonical_from_text(text.encode(), fmt)
    except NumericValueOutOfRange:
        return
    _check(bounded, rounded, fmt)


@settings(deadline=None)
@given(TEXT, FORMATS)
def test_text(value: str, fmt: SessionFormat) -> None:
    data = value.encode()
    for declared in ("text", "varchar", "varchar(5)", "char(5)"):
        codec = codec_for(declared)
        if declared in ("varchar(5)", "char(5)") and len(value.rstrip(" ")) > 5:
            continue
        canonical = codec.canonical_from_text(data, fmt)
        assert canonical == codec.canonical_from_binary(data, fmt)
        _check(codec, canonical, fmt)


@settings(deadline=None)
@given(st.binary(), FORMATS)
def test_bytea(value: bytes, fmt: SessionFormat) -> None:
    _check(codec_for("bytea"), value, fmt)


@settings(deadline=None)
@given(st.booleans(), st.uuids(), FORMATS)
def test_bool_and_uuid(flag: bool, value: uuid.UUID, fmt: SessionFormat) -> None:
    _check(codec_for("bool"), b"\x01" if flag else b"\x00", fmt)
    _check(codec_for("uuid"), value.bytes, fmt)
    assert codec_for("uuid").to_text(value.bytes, fmt) == str(value).encode()


@settings(deadline=None)
@given(
    st.integers(DATE_MIN, DATE_END - 1) | st.sampled_from([-(2**31), 2**31 - 1]),
    st.integers(MIN_TIMESTAMP, END_TIMESTAMP - 1) | st.sampled_from([-(2**63), 2**63 - 1]),
    FORMATS,
)
def test_date_and_timestamps(days: int, usecs: int, fmt: SessionFormat) -> None:
    _check(codec_for("date"), struct.pack(">i", days), fmt)
    _check(codec_for("timestamp"), struct.pack(">q", usecs), fmt)
    _check(codec_for("timestamptz"), struct.pack(">q", usecs), fmt)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, st.booleans(), FORMATS)
def test_json_and_jsonb(value: object, ascii_only: bool, fmt: SessionFormat) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    plain = codec_for("json")
    assert plain.canonical_from_text(data, fmt) == data
    _check(plain, data, fmt)
    binary_form = codec_for("jsonb")
    canonical = binary_form.canonical_from_text(data, fmt)
    assert binary_form.canonical_from_binary(b"\x01" + data, fmt) == canonical
    _check(binary_form, canonical, fmt)
    # The normal form is a fixed point and still means the same JSON.
    assert binary_form.canonical_from_text(canonical, fmt) == canonical
    assert json.loads(canonical, parse_float=Decimal, parse_int=Decimal) == json.loads(
        data, parse_float=Decimal, parse_int=Decimal
    )
