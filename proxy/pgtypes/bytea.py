"""bytea.

Canonical form: the raw bytes, which are also the binary wire format.

Text input is PostgreSQL 15's ``byteain``: ``\\x`` followed by hex digit pairs (spaces, tabs,
newlines and carriage returns allowed between pairs; bad digits 22023), or else the escape format
(``\\\\`` for a backslash, ``\\ooo`` octal, any other byte literally; a stray backslash 22P02). The
text is in the client encoding and reaches ``byteain`` converted to UTF-8, so literal non-ASCII
characters become their UTF-8 bytes. Text output follows ``bytea_output``: ``hex`` (the default)
or ``escape``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, invalid_syntax, utf8_from_client
from proxy.pgtypes.errors import InvalidParameterValue

_ESCAPE = re.compile(rb"\\(?:([0-3][0-7][0-7])|(\\))")
_HEX_SPACE = b" \n\t\r"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# byteaout's escape format: backslash doubled, bytes outside 0x20..0x7e as \ooo.
_ESCAPE_OUT = [b"\\\\" if b == 0x5C else bytes([b]) if 0x20 <= b <= 0x7E else b"\\%03o" % b for b in range(256)]


def _decode_hex(body: bytes) -> bytes:
    if not any(ch in body for ch in b"\v\f"):
        try:
            # fromhex skips ASCII whitespace between pairs only, like hex_decode, but knows \v and
            # \f as whitespace too: those are excluded above.
            return bytes.fromhex(body.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    # Walk the input the way hex_decode does, to decode it or report its error.
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        if body[i] in _HEX_SPACE:
            i += 1
            continue
        if body[i] not in _HEX_DIGITS:
            raise InvalidParameterValue("invalid hexadecimal digit")
        if i + 1 >= n:
            raise InvalidParameterValue("invalid hexadecimal data: odd number of digits")
        if body[i + 1] not in _HEX_DIGITS:
            raise InvalidParameterValue("invalid hexadecimal digit")
        out.append(int(body[i : i + 2], 16))
        i += 2
    return bytes(out)


def _decode_escape(data: bytes) -> bytes:
    if b"\\" not in data:
        return data
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(data):
        literal = data[pos : m.start()]
        if b"\\" in literal:
            raise invalid_syntax("bytea")
        out += literal
        octal = m.group(1)
        out.append(int(octal, 8) if octal is not None else 0x5C)
        pos = m.end()
    tail = data[pos:]
    if b"\\" in tail:
        raise invalid_syntax("bytea")
    out += tail
    return bytes(out)


@dataclass(frozen=True, slots=True)
class ByteaCodec:
    name: str = "bytea"
    oid: int = 17
    typlen: int = -1
    typmod: int = -1
    array_oid: int = 1001

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        data = utf8_from_client(data, fmt)
        if data[:2] == b"\\x":
            return _decode_hex(data[2:])
        return _decode_escape(data)

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return data

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        if fmt.bytea_output == "escape":
            table = _ESCAPE_OUT
            return b"".join([table[b] for b in canonical])
        return b"\\x" + canonical.hex().encode("ascii")

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return canonical


BYTEA = ByteaCodec()
