"""bool and uuid: small fixed-width types whose canonical form is their binary wire format.

bool: ``b"\\x01"`` or ``b"\\x00"``. Text input is ``boolin``: C whitespace trimmed, then, ignoring
case, any prefix of ``true``/``yes``/``false``/``no``, ``on``/``off`` with at least two letters, or
``1``/``0``. Binary input, like ``boolrecv``, takes any non-zero byte as true. Output ``t``/``f``.

uuid: the 16 bytes. Text input is ``uuid_in``: 32 hex digits in either case, optionally in braces,
with an optional hyphen after any group of four digits (not after the last); output is lowercase
in the 8-4-4-4-12 form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.pgtypes.base import C_SPACE, DEFAULT_FORMAT, SessionFormat, ascii_input, invalid_syntax
from proxy.pgtypes.errors import InvalidBinaryRepresentation

_TRUE = b"\x01"
_FALSE = b"\x00"


def _parse_bool(word: bytes) -> bytes | None:
    """parse_bool_with_len on an already trimmed, lowercased word."""
    if not word:
        return None
    first = word[:1]
    if first == b"t":
        return _TRUE if b"true".startswith(word) else None
    if first == b"y":
        return _TRUE if b"yes".startswith(word) else None
    if first == b"f":
        return _FALSE if b"false".startswith(word) else None
    if first == b"n":
        return _FALSE if b"no".startswith(word) else None
    if first == b"o" and len(word) >= 2:
        # A lone "o" could be either "on" or "off".
        if b"on".startswith(word):
            return _TRUE
        if b"off".startswith(word):
            return _FALSE
        return None
    if word == b"1":
        return _TRUE
    if word == b"0":
        return _FALSE
    return None


@dataclass(frozen=True, slots=True)
class BoolCodec:
    name: str = "bool"
    oid: int = 16
    typlen: int = 1
    typmod: int = -1
    array_oid: int = 1000

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        result = _parse_bool(ascii_input(data, fmt, "boolean").strip(C_SPACE).lower())
        if result is None:
            raise invalid_syntax("boolean")
        return result

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) != 1:
            raise InvalidBinaryRepresentation("incorrect binary data format for type boolean")
        return _FALSE if data == _FALSE else _TRUE

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        return b"t" if canonical == _TRUE else b"f"

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


_UUID = re.compile(rb"\{([0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7})\}|([0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7})")


@dataclass(frozen=True, slots=True)
class UuidCodec:
    name: str = "uuid"
    oid: int = 2950
    typlen: int = 16
    typmod: int = -1
    array_oid: int = 2951

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        m = _UUID.fullmatch(ascii_input(data, fmt, "uuid"))
        if m is None:
            raise invalid_syntax("uuid")
        return bytes.fromhex((m.group(1) or m.group(2)).replace(b"-", b"").decode("ascii"))

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        if len(data) != 16:
            raise InvalidBinaryRepresentation("incorrect binary data format for type uuid")
        return data

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        h = canonical.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode("ascii")

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


BOOL = BoolCodec()
UUID = UuidCodec()
