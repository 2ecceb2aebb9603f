from __future__ import annotations

import pytest

from proxy.pgtypes import (
    DEFAULT_FORMAT,
    CharacterNotInRepertoire,
    InvalidParameterValue,
    InvalidTextRepresentation,
    SessionFormat,
    codec_for,
)

BYTEA = codec_for("bytea")


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (b"\\x", b""),
        (b"\\x00ff10", b"\x00\xff\x10"),
        (b"\\xDEADbeef", b"\xde\xad\xbe\xef"),
        (b"\\x 00 ff \n", b"\x00\xff"),
        (b"abc", b"abc"),
        (b"a\\\\b", b"a\\b"),
        (b"\\001\\377", b"\x01\xff"),
        ("é".encode(), "é".encode()),
    ],
)
def test_text_input(text: bytes, canonical: bytes) -> None:
    assert BYTEA.canonical_from_text(text, DEFAULT_FORMAT) == canonical


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"\\x0 1", InvalidParameterValue),
        (b"\\x012", InvalidParameterValue),
        (b"\\x0g", InvalidParameterValue),
        (b"\\x\x0b00", InvalidParameterValue),
        (b"a\\b", InvalidTextRepresentation),
        (b"\\X00", InvalidTextRepresentation),
        (b"\\400", InvalidTextRepresentation),
        (b"\xff", CharacterNotInRepertoire),
    ],
)
def test_text_input_errors(text: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        BYTEA.canonical_from_text(text, DEFAULT_FORMAT)


def test_latin1_escape_input_is_converted_to_utf8() -> None:
    fmt = SessionFormat(client_encoding="LATIN1")
    assert BYTEA.canonical_from_text(b"\xe9", fmt) == "é".encode()


def test_output() -> None:
    value = b"\x00\x01\\\x7f\x80\xffA"
    assert BYTEA.to_text(value, DEFAULT_FORMAT) == b"\\x00015c7f80ff41"
    assert BYTEA.to_text(value, SessionFormat(bytea_output="escape")) == b"\\000\\001\\\\\\177\\200\\377A"
    assert BYTEA.to_binary(value) == value
    assert BYTEA.canonical_from_binary(value) == value
