from __future__ import annotations

import pytest

from proxy.pgtypes import DEFAULT_FORMAT, InvalidBinaryRepresentation, InvalidTextRepresentation, codec_for

BOOL = codec_for("boolean")
UUID = codec_for("uuid")
UUID_BYTES = bytes.fromhex("a0eebc999c0b4ef8bb6d6bb9bd380a11")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"t", True),
        (b"TRUE", True),
        (b"tr", True),
        (b" yes\n", True),
        (b"y", True),
        (b"on", True),
        (b"1", True),
        (b"f", False),
        (b"fal", False),
        (b"No", False),
        (b"of", False),
        (b"OFF", False),
        (b"0", False),
    ],
)
def test_bool_spellings(text: bytes, value: bool) -> None:
    canonical = BOOL.canonical_from_text(text, DEFAULT_FORMAT)
    assert canonical == (b"\x01" if value else b"\x00")
    assert BOOL.to_text(canonical, DEFAULT_FORMAT) == (b"t" if value else b"f")


@pytest.mark.parametrize("text", [b"o", b"", b"2", b"truex", b"10", b"onn", b"ye s"])
def test_bool_rejects(text: bytes) -> None:
    with pytest.raises(InvalidTextRepresentation):
        BOOL.canonical_from_text(text, DEFAULT_FORMAT)


def test_bool_binary_any_nonzero_is_true() -> None:
    assert BOOL.canonical_from_binary(b"\x07") == b"\x01"
    assert BOOL.canonical_from_binary(b"\x00") == b"\x00"
    with pytest.raises(InvalidBinaryRepresentation):
        BOOL.canonical_from_binary(b"\x00\x01")


@pytest.mark.parametrize(
    "text",
    [
        b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        b"A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        b"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        b"a0eebc999c0b4ef8bb6d6bb9bd380a11",
        b"a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
    ],
)
def test_uuid_forms(text: bytes) -> None:
    canonical = UUID.canonical_from_text(text, DEFAULT_FORMAT)
    assert canonical == UUID_BYTES
    assert UUID.to_text(canonical, DEFAULT_FORMAT) == b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


@pytest.mark.parametrize(
    "text",
    [
        b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
        b"a0eebc9-99c0b-4ef8-bb6d-6bb9bd380a11",
        b" a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        b"{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
        b"a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
    ],
)
def test_uuid_rejects(text: bytes) -> None:
    with pytest.raises(InvalidTextRepresentation):
        UUID.canonical_from_text(text, DEFAULT_FORMAT)


def test_uuid_binary() -> None:
    assert UUID.canonical_from_binary(UUID_BYTES) == UUID_BYTES
    with pytest.raises(InvalidBinaryRepresentation):
        UUID.canonical_from_binary(UUID_BYTES[:15])
