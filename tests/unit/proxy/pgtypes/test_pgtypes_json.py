from __future__ import annotations

import pytest

from proxy.pgtypes import (
    DEFAULT_FORMAT,
    InvalidBinaryRepresentation,
    InvalidTextRepresentation,
    NumericValueOutOfRange,
    UntranslatableCharacter,
    codec_for,
)

JSON = codec_for("json")
JSONB = codec_for("jsonb")


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        ' [1, 2.50, -0, 1e5, "x"] ',
        '{"a":1,"a":2}',
        '"\\ud800"',
        '"\\u0000"',
        "true",
        "null",
        "[[[[]]]]",
        '"é"',
        "{}",
        '{"":0}',
        "-0.0e-0",
        '"\\/"',
    ],
)
def test_json_keeps_valid_text_as_given(text: str) -> None:
    canonical = JSON.canonical_from_text(text.encode(), DEFAULT_FORMAT)
    assert canonical == text.encode()
    assert JSON.to_text(canonical, DEFAULT_FORMAT) == canonical
    assert JSON.to_binary(canonical) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "01",
        "[1,]",
        "{'a': 1}",
        "NaN",
        '"\\x"',
        '{"a" 1}',
        "",
        "  ",
        "1.",
        ".5",
        "-",
        "1e",
        "tru",
        '{"a":1} x',
        "[1] [2]",
        '"tab\there"',
        "[1}",
        '{"a":1,}',
        "+1",
        "\x0c1",
    ],
)
def test_json_rejects(text: str) -> None:
    for codec in (JSON, JSONB):
        with pytest.raises(InvalidTextRepresentation):
            codec.canonical_from_text(text.encode(), DEFAULT_FORMAT)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('{"b":1, "a": [1,2.50,1e2], "aa": {}, "a": "\\u00e9\\n\\u001f/"}', '{"a": "é\\n\\u001f/", "b": 1, "aa": {}}'),
        ('{"a":1,"a":2}', '{"a": 2}'),
        ('"\\ud83d\\ude00"', '"😀"'),
        ('"\\u0001\\u007f\\t"', '"\\u0001\x7f\\t"'),
        ("-0", "0"),
        ("0.0", "0.0"),
        ("1E2", "100"),
        ("[1, 1.0, 1.00, -0.0]", "[1, 1.0, 1.00, 0.0]"),
        ('{"aaa":1,"bb":2,"c":3,"ba":4,"é":5,"z":6}', '{"c": 3, "z": 6, "ba": 4, "bb": 2, "é": 5, "aaa": 1}'),
        ("[[], {}, [{}]]", "[[], {}, [{}]]"),
        ("  true  ", "true"),
        ('{"x": {"y": {"z": [1, {"w": null}]}}}', '{"x": {"y": {"z": [1, {"w": null}]}}}'),
        ('"a\\"b\\\\c\\/d"', '"a\\"b\\\\c/d"'),
        ('{"a":{"b":1,"b":2}}', '{"a": {"b": 2}}'),
    ],
)
def test_jsonb_normalises_like_postgres(text: str, canonical: str) -> None:
    result = JSONB.canonical_from_text(text.encode(), DEFAULT_FORMAT)
    assert result == canonical.encode()
    assert JSONB.canonical_from_text(result, DEFAULT_FORMAT) == result
    assert JSONB.to_binary(result) == b"\x01" + result
    assert JSONB.canonical_from_binary(b"\x01" + text.encode()) == result


def test_jsonb_escape_errors() -> None:
    with pytest.raises(InvalidTextRepresentation):
        JSONB.canonical_from_text(b'"\\ud800x"', DEFAULT_FORMAT)
    with pytest.raises(InvalidTextRepresentation):
        JSONB.canonical_from_text(b'"\\udc00"', DEFAULT_FORMAT)
    with pytest.raises(UntranslatableCharacter):
        JSONB.canonical_from_text(b'"\\u0000"', DEFAULT_FORMAT)
    with pytest.raises(NumericValueOutOfRange):
        JSONB.canonical_from_text(b"1e999999", DEFAULT_FORMAT)
    with pytest.raises(InvalidBinaryRepresentation):
        JSONB.canonical_from_binary(b"\x02{}")


def test_deep_nesting_does_not_exhaust_the_stack() -> None:
    depth = 100_000
    text = b"[" * depth + b"]" * depth
    assert JSON.canonical_from_text(text, DEFAULT_FORMAT) == text
    assert JSONB.canonical_from_text(text, DEFAULT_FORMAT) == text
