from __future__ import annotations

import math
import struct

import pytest

from proxy.pgtypes import DEFAULT_FORMAT, InvalidTextRepresentation, NumericValueOutOfRange, codec_for
from proxy.pgtypes.floating import format_float8

F8 = codec_for("float8")
F4 = codec_for("float4")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.5, b"1.5"),
        (-0.0, b"-0"),
        (0.0, b"0"),
        (1e30, b"1e+30"),
        (1e15, b"1e+15"),
        (1e14, b"100000000000000"),
        (0.0001, b"0.0001"),
        (0.00001, b"1e-05"),
        (123456789012345678.0, b"1.2345678901234568e+17"),
        (5e-324, b"5e-324"),
        (math.inf, b"Infinity"),
        (-math.inf, b"-Infinity"),
        (math.nan, b"NaN"),
        # Ryu without STRICTLY_SHORTEST: a decimal exactly halfway to a neighbour is never chosen.
        (2.1691341486096248e16, b"2.1691341486096248e+16"),
        (9007199254740993.0, b"9.007199254740992e+15"),
        (123456789012345.0, b"123456789012345"),
    ],
)
def test_float8_output(value: float, text: bytes) -> None:
    assert format_float8(value) == text


@pytest.mark.parametrize(
    ("text", "output"),
    [
        (b"100000", b"100000"),
        (b"1e6", b"1e+06"),
        (b"0.1", b"0.1"),
        (b"3.4028235e38", b"3.4028235e+38"),
        (b"1e-45", b"1e-45"),
        (b"10.6e9", b"1.0599999e+10"),
        (b"70785376", b"7.0785376e+07"),
        (b"16777217", b"1.6777216e+07"),
    ],
)
def test_float4_round_trip_output(text: bytes, output: bytes) -> None:
    assert F4.to_text(F4.canonical_from_text(text, DEFAULT_FORMAT), DEFAULT_FORMAT) == output


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"  -1.25e-3  ", -1.25e-3),
        (b"0x1.8p1", 3.0),
        (b"-0X10", -16.0),
        (b"inf", math.inf),
        (b"-Infinity", -math.inf),
        (b".5", 0.5),
        (b"5.", 5.0),
        (b"4.9e-324", 5e-324),
    ],
)
def test_float8_input(text: bytes, value: float) -> None:
    assert F8.canonical_from_text(text, DEFAULT_FORMAT) == struct.pack(">d", value)


def test_float4_rounds_straight_from_decimal() -> None:
    # Just above the float4 midpoint 1 + 2**-24: the nearest double is the midpoint itself, which
    # would round to even (1.0); strtof rounds the exact value up.
    exact = b"1.0000000596046447753906250000000000001"
    assert struct.unpack(">f", F4.canonical_from_text(exact, DEFAULT_FORMAT))[0] == 1 + 2**-23
    assert struct.unpack(">f", F4.canonical_from_text(b"1.000000059604644775390625", DEFAULT_FORMAT))[0] == 1.0


@pytest.mark.parametrize(
    ("codec_name", "text"),
    [("float8", b"1e309"), ("float8", b"1e-400"), ("float4", b"3.5e38"), ("float4", b"1e-46"), ("float8", b"0x1p5000")],
)
def test_out_of_range(codec_name: str, text: bytes) -> None:
    with pytest.raises(NumericValueOutOfRange):
        codec_for(codec_name).canonical_from_text(text, DEFAULT_FORMAT)


@pytest.mark.parametrize("text", [b"", b" ", b"1e", b"infinit", b"1_0", b"1,5", b".", b"0x", b"1.5f"])
def test_invalid_syntax(text: bytes) -> None:
    with pytest.raises(InvalidTextRepresentation):
        F8.canonical_from_text(text, DEFAULT_FORMAT)


def test_every_nan_is_one_canonical_value() -> None:
    negative_nan = b"\xff\xf8\x00\x00\x00\x00\x00\x00"
    payload_nan = b"\x7f\xf0\x00\x00\x00\x00\x00\x01"
    canonical = F8.canonical_from_text(b"NaN", DEFAULT_FORMAT)
    assert F8.canonical_from_text(b"-nan", DEFAULT_FORMAT) == canonical
    assert F8.canonical_from_binary(negative_nan) == canonical
    assert F8.canonical_from_binary(payload_nan) == canonical
    assert F4.canonical_from_binary(b"\xff\xc0\x00\x01") == F4.canonical_from_text(b"nan", DEFAULT_FORMAT)


def test_negative_zero_stays_distinct() -> None:
    assert F8.canonical_from_text(b"-0", DEFAULT_FORMAT) != F8.canonical_from_text(b"0", DEFAULT_FORMAT)
