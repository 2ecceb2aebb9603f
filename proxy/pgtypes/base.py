"""The seam every value codec implements, the session settings they read, and shared text helpers.

A codec turns a client's value (text or binary wire format, in the client's encoding) into one
canonical byte string per value, which is what the proxy encrypts and indexes, and turns a canonical
byte string back into the wire format the client asked for. Codecs are pure functions of their input
and the session's reported settings: no I/O, no clock, no logging of values.

Canonical text is always UTF-8. The client's encoding is honoured on the way in and out (PostgreSQL
converts text and binary text-like values between client and server encoding; we do the same), for
UTF8, SQL_ASCII (treated as UTF-8, as a UTF8 server verifies it) and the single-byte encodings; any
other client encoding is refused with 0A000 on the first value that needs converting. Statement text
(Query, Parse) is read in the same encodings (``statement_text``); in the others pgveil leaves it as
the protocol codec decoded it, and ``proxy/rewrite/reading.py`` decides what it may still read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Protocol

from proxy.pgtypes.errors import (
    CharacterNotInRepertoire,
    InvalidTextRepresentation,
    UnsupportedValueFormat,
    UntranslatableCharacter,
)

# C isspace() in the C locale: what PostgreSQL's input functions skip around a value.
C_SPACE = b" \t\n\r\v\f"


@dataclass(frozen=True, slots=True)
class SessionFormat:
    """The settings that change how a value is written as text, from the server's ParameterStatus.

    ``bytea_output`` is not reported by PostgreSQL; the session tracks it from ``SET`` if it can,
    and the default is the server default, ``hex``. ``server_version`` (reported once, at startup)
    decides which scanner rules the server applies to statement text; ``server_major`` is 0 until it
    is known.
    """

    timezone: str = "UTC"
    datestyle: str = "ISO, MDY"
    intervalstyle: str = "postgres"
    client_encoding: str = "UTF8"
    standard_conforming_strings: bool = True
    bytea_output: str = "hex"
    server_version: str = ""

    @property
    def server_major(self) -> int:
        """The server's major version (``15`` for "15.4 (Debian 15.4-1)", ``9`` for "9.6.2"), 0 if unknown."""
        digits = ""
        for ch in self.server_version:
            if not ch.isdigit():
                break
            digits += ch
        return int(digits) if digits else 0

    def with_parameter(self, name: str, value: str) -> SessionFormat:
        """This format updated by one ParameterStatus (name, value); unknown names change nothing."""
        key = name.lower()
        if key == "timezone":
            return replace(self, timezone=value)
        if key == "datestyle":
            return replace(self, datestyle=value)
        if key == "intervalstyle":
            return replace(self, intervalstyle=value)
        if key == "client_encoding":
            return replace(self, client_encoding=value)
        if key == "standard_conforming_strings":
            return replace(self, standard_conforming_strings=value.lower() in ("on", "true", "1"))
        if key == "bytea_output":
            return replace(self, bytea_output=value.lower())
        if key == "server_version":
            return replace(self, server_version=value)
        return self


DEFAULT_FORMAT = SessionFormat()


class TypeCodec(Protocol):
    """Converts one declared type between wire formats and its canonical bytes.

    ``name`` is the normalised declared type (``"varchar(20)"``); ``oid``, ``typlen`` and ``typmod``
    are what a RowDescription shows for a column of that type; ``array_oid`` is the type's array.
    The binary methods take ``fmt`` only for ``client_encoding``: text-like types are sent in the
    client's encoding in binary format too.
    """

    @property
    def name(self) -> str: ...
    @property
    def oid(self) -> int: ...
    @property
    def typlen(self) -> int: ...
    @property
    def typmod(self) -> int: ...
    @property
    def array_oid(self) -> int: ...

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes: ...
    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes: ...
    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes: ...
    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes: ...


# PostgreSQL encoding name -> Python codec, for the encodings whose PostgreSQL conversion tables are
# the standard single-byte mappings. None means "the bytes are UTF-8 already".
_ENCODINGS: dict[str, str | None] = {
    "UTF8": None,
    "UNICODE": None,
    "SQLASCII": None,
    "LATIN1": "latin-1",
    "LATIN2": "iso8859_2",
    "LATIN3": "iso8859_3",
    "LATIN4": "iso8859_4",
    "LATIN5": "iso8859_9",
    "LATIN6": "iso8859_10",
    "LATIN7": "iso8859_13",
    "LATIN8": "iso8859_14",
    "LATIN9": "iso8859_15",
    "LATIN10": "iso8859_16",
    "ISO88595": "iso8859_5",
    "ISO88596": "iso8859_6",
    "ISO88597": "iso8859_7",
    "ISO88598": "iso8859_8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8_r",
    "KOI8U": "koi8_u",
}


@functools.lru_cache(maxsize=64)
def python_codec(client_encoding: str) -> str | None:
    """The Python codec for a PostgreSQL client encoding name; None for UTF-8 (no conversion)."""
    # PostgreSQL matches encoding names ignoring case and non-alphanumerics ("utf-8" == "UTF8").
    key = "".join(ch for ch in client_encoding.upper() if ch.isalnum())
    try:
        return _ENCODINGS[key]
    except KeyError:
        raise UnsupportedValueFormat(
            f'client_encoding "{client_encoding}" is not supported for encrypted columns',
            hint="Use UTF8 (SET client_encoding = 'UTF8').",
        ) from None


def _statement_codec(fmt: SessionFormat) -> str | None:
    try:
        return python_codec(fmt.client_encoding)
    except UnsupportedValueFormat:
        return None  # left as the protocol codec decoded it; reading.py decides what may be read


def statement_text(wire: str, fmt: SessionFormat) -> str:
    """A Query or Parse string as the protocol codec hands it over (its bytes as UTF-8, any other byte
    as a surrogate escape) read in the client's encoding, as the server will read it. Bytes the
    encoding does not define stay surrogate escapes (libpg_query then refuses to parse the text)."""
    if wire.isascii():
        return wire
    codec = _statement_codec(fmt)
    if codec is None:
        return wire
    return wire.encode("utf-8", "surrogateescape").decode(codec, "surrogateescape")


def wire_text(text: str, fmt: SessionFormat) -> str:
    """The inverse of :func:`statement_text`: a (rewritten) statement back in the protocol codec's form."""
    if text.isascii():
        return text
    codec = _statement_codec(fmt)
    if codec is None:
        return text
    return text.encode(codec, "surrogateescape").decode("utf-8", "surrogateescape")


def statement_bytes(text: str, fmt: SessionFormat) -> bytes:
    """Part of a statement read by :func:`statement_text` (a literal's plaintext) as the client's bytes."""
    return text.encode(_statement_codec(fmt) or "utf-8", "surrogateescape")


def decode_client(data: bytes, fmt: SessionFormat) -> str:
    """Client-encoded bytes as text; raises 22021 for bytes invalid in that encoding, or a NUL."""
    codec = python_codec(fmt.client_encoding)
    try:
        text = data.decode("utf-8") if codec is None else data.decode(codec)
    except UnicodeDecodeError:
        raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "{fmt.client_encoding}"') from None
    if "\x00" in text:
        raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "{fmt.client_encoding}"')
    return text


def utf8_from_client(data: bytes, fmt: SessionFormat) -> bytes:
    """Client-encoded bytes converted to validated UTF-8 (the canonical text encoding)."""
    if python_codec(fmt.client_encoding) is None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "{fmt.client_encoding}"') from None
        if b"\x00" in data:
            raise CharacterNotInRepertoire(f'invalid byte sequence for encoding "{fmt.client_encoding}"')
        return data
    return decode_client(data, fmt).encode("utf-8")


def utf8_to_client(canonical: bytes, fmt: SessionFormat) -> bytes:
    """Canonical UTF-8 converted to the client's encoding; 22P05 for a character it cannot hold."""
    codec = python_codec(fmt.client_encoding)
    if codec is None:
        return canonical
    try:
        return canonical.decode("utf-8").encode(codec)
    except UnicodeEncodeError:
        raise UntranslatableCharacter(
            f'a character in encoding "UTF8" has no equivalent in encoding "{fmt.client_encoding}"'
        ) from None


def ascii_input(data: bytes, fmt: SessionFormat, type_name: str) -> bytes:
    """Text input of a type whose syntax is pure ASCII.

    Non-ASCII bytes can never be valid, but PostgreSQL checks the encoding before the syntax, so
    a byte sequence invalid in the client encoding reports 22021 rather than 22P02.
    """
    if data.isascii():
        return data
    decode_client(data, fmt)
    raise InvalidTextRepresentation(f"invalid input syntax for type {type_name}")


def invalid_syntax(type_name: str) -> InvalidTextRepresentation:
    return InvalidTextRepresentation(f"invalid input syntax for type {type_name}")
