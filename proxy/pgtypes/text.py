"""text, varchar, varchar(N), char(N) (bpchar).

Canonical form: the value as UTF-8, after the length rule an assignment to the column applies:
more than N characters is 22001 unless every character beyond N is a space, in which case the
spaces are cut; char(N) is blank-padded to N characters, as PostgreSQL stores it. Lengths count
characters (code points), like PostgreSQL with a UTF-8 database.

Text and binary formats carry the same bytes (in the client's encoding), so both directions share
one path. A NUL or bytes invalid in the client encoding are 22021, as in PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.pgtypes.base import DEFAULT_FORMAT, SessionFormat, utf8_from_client, utf8_to_client
from proxy.pgtypes.errors import StringDataRightTruncation


@dataclass(frozen=True, slots=True)
class TextCodec:
    name: str
    oid: int
    array_oid: int
    sql_name: str
    max_chars: int = -1
    pad: bool = False
    typlen: int = -1

    @property
    def typmod(self) -> int:
        return self.max_chars + 4 if self.max_chars >= 0 else -1

    def _canonical(self, data: bytes, fmt: SessionFormat) -> bytes:
        utf8 = utf8_from_client(data, fmt)
        limit = self.max_chars
        # A byte count within the limit bounds the character count too: nothing to cut.
        if limit < 0 or (len(utf8) <= limit and not self.pad):
            return utf8
        text = utf8.decode("utf-8")
        length = len(text)
        if length > limit:
            if text[limit:].strip(" "):
                raise StringDataRightTruncation(f"value too long for type {self.sql_name}")
            return text[:limit].encode("utf-8")
        if self.pad and length < limit:
            return utf8 + b" " * (limit - length)
        return utf8

    def canonical_from_text(self, data: bytes, fmt: SessionFormat) -> bytes:
        return self._canonical(data, fmt)

    def canonical_from_binary(self, data: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return self._canonical(data, fmt)

    def to_text(self, canonical: bytes, fmt: SessionFormat) -> bytes:
        return utf8_to_client(canonical, fmt)

    def to_binary(self, canonical: bytes, fmt: SessionFormat = DEFAULT_FORMAT) -> bytes:
        return utf8_to_client(canonical, fmt)


TEXT = TextCodec("text", 25, 1009, "text")
VARCHAR = TextCodec("varchar", 1043, 1015, "character varying")
BPCHAR = TextCodec("bpchar", 1042, 1014, "bpchar")


def varchar_codec(length: int) -> TextCodec:
    return TextCodec(f"varchar({length})", 1043, 1015, f"character varying({length})", max_chars=length)


def char_codec(length: int) -> TextCodec:
    return TextCodec(f"char({length})", 1042, 1014, f"character({length})", max_chars=length, pad=True)
