from __future__ import annotations

import pytest

from proxy.pgtypes import (
    DEFAULT_FORMAT,
    InvalidBinaryRepresentation,
    InvalidTextRepresentation,
    NumericValueOutOfRange,
    codec_for,
)

NUMERIC = codec_for("numeric")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (b"0", b"0"),
        (b"-0.00", b"0.00"),
        (b"1.50", b"1.50"),
        (b"+.5", b"0.5"),
        (b"5.", b"5"),
        (b"1e5", b"100000"),
        (b"1E-5", b"0.00001"),
        (b"1.23e+2", b"123"),
        (b"1.5e-1", b"0.15"),
        (b"1e 5", b"100000"),  # strtol skips blanks after the "e"
        (b" 0.000001000 ", b"0.000001000"),
        (b"00012.3400", b"12.3400"),
        (b"NaN", b"NaN"),
        (b"-inf", b"-Infinity"),
        (b" +Infinity ", b"Infinity"),
    ],
)
def test_text_input_keeps_display_scale(text: bytes, canonical: bytes) -> None:
    assert NUMERIC.canonical_from_text(text, DEFAULT_FORMAT) == canonical
    assert NUMERIC.to_text(canonical, DEFAULT_FORMAT) == canonical


@pytest.mark.parametrize("text", [b"", b".", b"-", b"1e", b"1..2", b"12a", b"infinityx", b"1e+", b"0x10", b"1,5"])
def test_invalid_syntax(text: bytes) -> None:
    with pytest.raises(InvalidTextRepresentation):
        NUMERIC.canonical_from_text(text, DEFAULT_FORMAT)


@pytest.mark.parametrize("text", [b"1e131072", b"1e-16384", b"1e2000000000", b"1e99999999999999999999"])
def test_outside_numeric_range(text: bytes) -> None:
    with pytest.raises(NumericValueOutOfRange):
        NUMERIC.canonical_from_text(text, DEFAULT_FORMAT)


def test_largest_values_are_accepted() -> None:
    assert NUMERIC.canonical_from_text(b"1e131071", DEFAULT_FORMAT) == b"1" + b"0" * 131071
    assert NUMERIC.canonical_from_text(b"1e-16383", DEFAULT_FORMAT) == b"0." + b"0" * 16382 + b"1"


@pytest.mark.parametrize(
    ("declared", "text", "canonical"),
    [
        ("numeric(5,2)", b"1.005", b"1.01"),
        ("numeric(5,2)", b"-1.005", b"-1.01"),
        ("numeric(5,2)", b"1.004", b"1.00"),
        ("numeric(5,2)", b"999.994", b"999.99"),
        ("numeric(5,2)", b"1e-20", b"0.00"),
        ("numeric(5,2)", b"NaN", b"NaN"),
        ("numeric(3,-2)", b"12349", b"12300"),
        ("numeric(3,-2)", b"12350", b"12400"),
        ("numeric(3,-2)", b"49", b"0"),
        ("numeric(2,4)", b"0.00994", b"0.0099"),
        ("numeric(10)", b"2.5", b"3"),
        ("numeric(10)", b"-2.5", b"-3"),
    ],
)
def test_typmod_rounds_half_away_from_zero(declared: str, text: bytes, canonical: bytes) -> None:
    assert codec_for(declared).canonical_from_text(text, DEFAULT_FORMAT) == canonical


@pytest.mark.parametrize(
    ("declared", "text"),
    [
        ("numeric(5,2)", b"999.995"),
        ("numeric(5,2)", b"12345"),
        ("numeric(5,2)", b"Infinity"),
        ("numeric(3,-2)", b"99950"),
        ("numeric(2,4)", b"0.01"),
        ("numeric(2,4)", b"0.00995"),
    ],
)
def test_typmod_overflow(declared: str, text: bytes) -> None:
    with pytest.raises(NumericValueOutOfRange) as excinfo:
        codec_for(declared).canonical_from_text(text, DEFAULT_FORMAT)
    assert excinfo.value.message == "numeric field overflow"
    assert excinfo.value.detail is not None


@pytest.mark.parametrize(
    ("canonical", "binary"),
    [
        (b"0.00", b"\x00\x00\x00\x00\x00\x00\x00\x02"),
        (b"100000", b"\x00\x01\x00\x01\x00\x00\x00\x00\x00\x0a"),
        (b"-12345.678", b"\x00\x03\x00\x01\x40\x00\x00\x03\x00\x01\x09\x29\x1a\x7c"),
        (b"0.00001", b"\x00\x01\xff\xfe\x00\x00\x00\x05\x03\xe8"),
        (b"NaN", b"\x00\x00\x00\x00\xc0\x00\x00\x00"),
        # numeric_send reports display scale 32 for the infinities (bits of their sign word).
        (b"Infinity", b"\x00\x00\x00\x00\xd0\x00\x00\x20"),
        (b"-Infinity", b"\x00\x00\x00\x00\xf0\x00\x00\x20"),
    ],
)
def test_binary_format(canonical: bytes, binary: bytes) -> None:
    assert NUMERIC.to_binary(canonical) == binary
    assert NUMERIC.canonical_from_binary(binary) == canonical


def test_binary_input_truncates_digits_hidden_by_the_scale() -> None:
    # 1.23456 sent with dscale 2: numeric_recv truncates (does not round) to 1.23.
    binary = b"\x00\x03\x00\x00\x00\x00\x00\x02\x00\x01\x09\x29\x17\x70"
    assert NUMERIC.canonical_from_binary(binary) == b"1.23"
    assert codec_for("numeric(3,1)").canonical_from_binary(binary) == b"1.2"


@pytest.mark.parametrize(
    "binary",
    [
        b"\x00\x01\x00\x00\x00\x00\x00\x00",  # one digit announced, none sent
        b"\x00\x00\x00\x00\x12\x34\x00\x00",  # bad sign
        b"\x00\x00\x00\x00\x00\x00\x40\x00",  # scale beyond 14 bits
        b"\x00\x01\x00\x00\x00\x00\x00\x00\x27\x10",  # digit 10000
        b"\x0b\xb9\x00\x00\x00\x00\x00\x00",  # 3001 digits
        b"\x00\x00",
    ],
)
def test_invalid_binary(binary: bytes) -> None:
    with pytest.raises(InvalidBinaryRepresentation):
        NUMERIC.canonical_from_binary(binary)


def test_typmod_values() -> None:
    assert codec_for("numeric").typmod == -1
    assert codec_for("numeric(10,2)").typmod == (10 << 16 | 2) + 4
    assert codec_for("numeric(3,-2)").typmod == (3 << 16 | (-2 & 0x7FF)) + 4
