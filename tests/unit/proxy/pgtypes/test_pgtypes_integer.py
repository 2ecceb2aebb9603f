from __future__ import annotations

import pytest

from proxy.pgtypes import (
    DEFAULT_FORMAT,
    InvalidBinaryRepresentation,
    InvalidTextRepresentation,
    NumericValueOutOfRange,
    codec_for,
)


@pytest.mark.parametrize(
    ("declared", "text", "canonical"),
    [
        ("int2", b"0", b"\x00\x00"),
        ("int2", b" \t-32768\n", b"\x80\x00"),
        ("int2", b"+0032767 ", b"\x7f\xff"),
        ("int4", b"-1", b"\xff\xff\xff\xff"),
        ("int4", b"0" * 5000 + b"7", b"\x00\x00\x00\x07"),
        ("int8", b"9223372036854775807", b"\x7f\xff\xff\xff\xff\xff\xff\xff"),
        ("int8", b"-9223372036854775808", b"\x80" + b"\x00" * 7),
    ],
)
def test_text_input(declared: str, text: bytes, canonical: bytes) -> None:
    codec = codec_for(declared)
    assert codec.canonical_from_text(text, DEFAULT_FORMAT) == canonical
    assert codec.canonical_from_binary(canonical) == canonical
    assert codec.to_binary(canonical) == canonical


@pytest.mark.parametrize(
    ("declared", "text", "error"),
    [
        ("int2", b"32768", NumericValueOutOfRange),
        ("int2", b"-32769", NumericValueOutOfRange),
        # PostgreSQL checks the range while reading digits, before it sees the junk.
        ("int2", b"99999x", NumericValueOutOfRange),
        ("int2", b"12x", InvalidTextRepresentation),
        ("int4", b"", InvalidTextRepresentation),
        ("int4", b"1_000", InvalidTextRepresentation),
        ("int4", b"0x10", InvalidTextRepresentation),
        ("int4", b"1.0", InvalidTextRepresentation),
        ("int4", b"- 1", InvalidTextRepresentation),
        ("int8", b"9" * 100, NumericValueOutOfRange),
        ("int8", b"9223372036854775808", NumericValueOutOfRange),
    ],
)
def test_text_input_errors(declared: str, text: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        codec_for(declared).canonical_from_text(text, DEFAULT_FORMAT)


def test_text_output() -> None:
    codec = codec_for("int8")
    assert codec.to_text(b"\x80" + b"\x00" * 7, DEFAULT_FORMAT) == b"-9223372036854775808"
    assert codec_for("int2").to_text(b"\x00\x2a", DEFAULT_FORMAT) == b"42"


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00"])
def test_binary_input_must_have_the_width(data: bytes) -> None:
    with pytest.raises(InvalidBinaryRepresentation):
        codec_for("int2").canonical_from_binary(data)
