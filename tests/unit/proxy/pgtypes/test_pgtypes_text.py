from __future__ import annotations

import pytest

from proxy.pgtypes import (
    DEFAULT_FORMAT,
    CharacterNotInRepertoire,
    SessionFormat,
    StringDataRightTruncation,
    UnsupportedValueFormat,
    UntranslatableCharacter,
    codec_for,
)

LATIN1 = SessionFormat(client_encoding="LATIN1")


@pytest.mark.parametrize(
    ("declared", "value", "canonical"),
    [
        ("text", "héllo ✓", "héllo ✓"),
        ("varchar(3)", "abc", "abc"),
        ("varchar(3)", "abc   ", "abc"),
        ("varchar(3)", "äöü  ", "äöü"),
        ("varchar(3)", "a", "a"),
        ("char(3)", "a", "a  "),
        ("char(3)", "é", "é  "),
        ("char(3)", "abc  ", "abc"),
        ("char(3)", "", "   "),
        ("char", "x", "x"),
        ("char", "x  ", "x"),
        ("bpchar", "x  ", "x  "),
        ("varchar", "x" * 1000, "x" * 1000),
    ],
)
def test_length_rules(declared: str, value: str, canonical: str) -> None:
    codec = codec_for(declared)
    data = value.encode()
    assert codec.canonical_from_text(data, DEFAULT_FORMAT) == canonical.encode()
    assert codec.canonical_from_binary(data) == canonical.encode()


@pytest.mark.parametrize(
    ("declared", "value"),
    [("varchar(3)", "abcd"), ("varchar(3)", "abc d"), ("varchar(3)", "a\t  \t"), ("char(3)", "äöüß"), ("char", "ab")],
)
def test_too_long(declared: str, value: str) -> None:
    with pytest.raises(StringDataRightTruncation) as excinfo:
        codec_for(declared).canonical_from_text(value.encode(), DEFAULT_FORMAT)
    assert "value too long for type" in excinfo.value.message


@pytest.mark.parametrize("data", [b"\xff", b"a\x00b", b"\xed\xa0\x80", b"\xc0\xaf"])
def test_invalid_utf8_or_nul(data: bytes) -> None:
    with pytest.raises(CharacterNotInRepertoire):
        codec_for("text").canonical_from_text(data, DEFAULT_FORMAT)


def test_client_encoding_conversion() -> None:
    codec = codec_for("char(3)")
    canonical = codec.canonical_from_text("é".encode("latin-1"), LATIN1)
    assert canonical == "é  ".encode()
    assert codec.to_text(canonical, LATIN1) == "é  ".encode("latin-1")
    assert codec.to_binary(canonical, LATIN1) == "é  ".encode("latin-1")
    with pytest.raises(UntranslatableCharacter):
        codec_for("text").to_text("✓".encode(), LATIN1)


def test_sql_ascii_is_read_as_utf8() -> None:
    fmt = SessionFormat(client_encoding="SQL_ASCII")
    assert codec_for("text").canonical_from_text("é".encode(), fmt) == "é".encode()


def test_unsupported_client_encoding_is_refused() -> None:
    with pytest.raises(UnsupportedValueFormat):
        codec_for("text").canonical_from_text(b"abc", SessionFormat(client_encoding="SJIS"))


def test_descriptors() -> None:
    assert (codec_for("text").oid, codec_for("text").typmod) == (25, -1)
    varchar = codec_for("varchar(20)")
    assert (varchar.oid, varchar.typlen, varchar.typmod, varchar.array_oid) == (1043, -1, 24, 1015)
    char = codec_for("character(3)")
    assert (char.oid, char.typmod, char.name) == (1042, 7, "char(3)")
    assert codec_for("char").typmod == 5
