"""The per-row hot path: one function that takes a whole DataRow body and a column plan and returns the
rewritten body. Everything per row that touches protected values happens here and nowhere else, so a
native kernel can replace :func:`rewrite_data_row` without touching the rest of the proxy.

DataRow body (PostgreSQL docs, "Message Formats", DataRow)::

    Int16   number of columns
    then per column:
    Int32   length of the value in bytes (-1: NULL, no bytes follow)
    Byte_n  the value, in the format the portal asked for

A protected column's value from the server is a v1 envelope (see :mod:`keymgmt.envelope`): raw bytes when
the proxy asked for binary, ``\\x`` followed by hex when the result is in text format (simple queries).
NULL stays NULL. The value is decrypted, and the canonical plaintext is encoded with the declared type's
codec in the format the client asked for. Unprotected columns are copied as they are.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag

from keymgmt.envelope import HEADER_LENGTH, MIN_LENGTH, DataKey, KeyState
from proxy.errors import ProxyError
from proxy.pgtypes.base import SessionFormat, TypeCodec
from proxy.pgtypes.bytea import BYTEA
from proxy.protocol.codec import CodecError
from proxy.rewrite.catalog import ProtectedColumn

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_HEADER = struct.Struct("!cI")
_ASCII_FORMAT = SessionFormat()  # escape-format bytea output is ASCII: the client encoding does not matter
_NULL = b"\xff\xff\xff\xff"
_PREFIX_LEN = 4  # magic · version · algorithm
_PREFIX_V1 = b"PV\x01\x01"
_KEY_END = 20


@dataclass(frozen=True, slots=True)
class ColumnOutput:
    """How one protected result column is turned back into what the client asked for."""

    column: ProtectedColumn
    codec: TypeCodec
    associated: bytes  # keymgmt.envelope.column_associated_data(column.column_id)
    server_binary: bool  # the server sends the raw envelope (binary) rather than bytea hex text
    client_binary: bool  # the client asked for the declared type's binary format
    # The canonical bytes are already what the client gets (text-like types to a UTF8 client, in either
    # format): the hot path then skips the codec call.
    identity: bool = False


RowPlan = tuple[ColumnOutput | None, ...]
KeyLookup = Callable[[bytes], DataKey | None]


class RowDecryptError(Exception):
    """A protected value in a row could not be opened; ``column`` says which. Carries no value bytes."""

    def __init__(self, column: ProtectedColumn, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


def _decode_hex(value: bytes, out: ColumnOutput) -> bytes:
    """A bytea in text output: hex (``\\x…``), or escape format when the session set
    ``bytea_output = escape`` (the envelope starts with "PV", so it never looks like hex output)."""
    try:
        if value[:2] == b"\\x":
            return bytes.fromhex(value[2:].decode("ascii"))
        return BYTEA.canonical_from_text(value, _ASCII_FORMAT)
    except (ValueError, UnicodeDecodeError, ProxyError):
        raise RowDecryptError(out.column, "the stored value is not an envelope") from None


def open_value(envelope: bytes, out: ColumnOutput, keys: KeyLookup) -> bytes:
    """The canonical plaintext of one stored value (an inlined, allocation-light envelope open)."""
    if len(envelope) < MIN_LENGTH or envelope[:_PREFIX_LEN] != _PREFIX_V1:
        raise RowDecryptError(out.column, "the stored value is not an envelope")
    key = keys(envelope[_PREFIX_LEN:_KEY_END])
    if key is None:
        raise RowDecryptError(out.column, "the value's data key is unknown or destroyed")
    if key.state is not KeyState.ENABLED:
        raise RowDecryptError(out.column, "the value's data key is disabled")
    header = envelope[:HEADER_LENGTH]
    try:
        return key._aead.decrypt(header[_KEY_END:], envelope[HEADER_LENGTH:], header + out.associated)
    except InvalidTag:
        raise RowDecryptError(out.column, "the value failed authentication") from None


def rewrite_value_text(stored: bytes, out: ColumnOutput, keys: KeyLookup, fmt: SessionFormat) -> bytes:
    """One stored value in bytea text form (``\\x…``, as COPY TO sends it) to the declared type's text."""
    canonical = open_value(_decode_hex(stored, out), out, keys)
    try:
        return out.codec.to_text(canonical, fmt)
    except (ValueError, ProxyError):
        raise RowDecryptError(out.column, "the decrypted value is not valid for the column's type") from None


def rewrite_data_row(
    body: bytes, plan: RowPlan, keys: KeyLookup, fmt: SessionFormat, memo: dict[bytes, Any] | None = None
) -> bytes:
    """The DataRow body with every protected value decrypted and encoded for the client.

    ``memo`` (key id → the key's decrypt function) may be shared by the rows of one result: the
    caller drops it when a new result starts, so a key disabled or destroyed meanwhile is looked up
    again then."""
    try:
        return _rewrite_data_row(body, plan, keys, fmt, {} if memo is None else memo)
    except struct.error:
        raise CodecError("server", "malformed DataRow message") from None


def _rewrite_data_row(body: bytes, plan: RowPlan, keys: KeyLookup, fmt: SessionFormat, memo: dict[bytes, Any]) -> bytes:
    # Written for speed: this runs once per protected value. The envelope checks are open_value's,
    # inlined; AES-GCM verifies the tag before anything is returned.
    (ncols,) = _I16.unpack_from(body, 0)
    if ncols != len(plan):
        raise RowDecryptError(_first(plan), "the row does not match its description")
    parts: list[bytes] = []
    pos = 2
    start = 0
    size = len(body)
    unpack = _I32.unpack_from
    pack = _I32.pack
    for out in plan:
        (n,) = unpack(body, pos)
        if out is None or n < 0:
            pos += 4 + (n if n > 0 else 0)
            continue
        end = pos + 4 + n
        if end > size:
            raise struct.error("value runs past the end of the row")
        envelope = body[pos + 4 : end] if out.server_binary else _decode_hex(body[pos + 4 : end], out)
        if len(envelope) < MIN_LENGTH or not envelope.startswith(_PREFIX_V1):
            raise RowDecryptError(out.column, "the stored value is not an envelope")
        kid = envelope[_PREFIX_LEN:_KEY_END]
        decrypt = memo.get(kid)
        if decrypt is None:
            key = keys(kid)
            if key is None:
                raise RowDecryptError(out.column, "the value's data key is unknown or destroyed")
            if key.state is not KeyState.ENABLED:
                raise RowDecryptError(out.column, "the value's data key is disabled")
            decrypt = memo[kid] = key._aead.decrypt
        try:
            canonical = decrypt(
                envelope[_KEY_END:HEADER_LENGTH], envelope[HEADER_LENGTH:], envelope[:HEADER_LENGTH] + out.associated
            )
        except InvalidTag:
            raise RowDecryptError(out.column, "the value failed authentication") from None
        encoded = canonical if out.identity else _encode(canonical, out, fmt)
        if start < pos:
            parts.append(body[start:pos])
        parts.append(pack(len(encoded)) + encoded)
        pos = end
        start = pos
    if pos != size:
        raise RowDecryptError(_first(plan), "the row does not match its description")
    if start == 0:
        return body
    if start < pos:
        parts.append(body[start:pos])
    return b"".join(parts)


def rewrite_data_rows(
    data: bytes, start: int, end: int, plan: RowPlan, keys: KeyLookup, fmt: SessionFormat, memo: dict[bytes, Any]
) -> bytes:
    """A run of consecutive, complete DataRow messages (type byte and length included) in
    ``data[start:end]``, rewritten: the batch form of :func:`rewrite_data_row`, which saves the per-message
    dispatch of the relay. Returns the framed messages."""
    parts: list[bytes] = []
    unpack = _HEADER.unpack_from
    pack = _HEADER.pack
    pos = start
    try:
        while pos < end:
            _, ln = unpack(data, pos)
            row = _rewrite_data_row(data[pos + 5 : pos + 1 + ln], plan, keys, fmt, memo)
            parts.append(pack(b"D", len(row) + 4))
            parts.append(row)
            pos += 1 + ln
    except struct.error:
        raise CodecError("server", "malformed DataRow message") from None
    return b"".join(parts)


def _encode(canonical: bytes, out: ColumnOutput, fmt: SessionFormat) -> bytes:
    if out.codec.typlen > 0 and len(canonical) != out.codec.typlen:
        # Authentic, but not a value of the declared fixed-width type (the declaration changed?).
        raise RowDecryptError(out.column, "the decrypted value is not valid for the column's type")
    try:
        return out.codec.to_binary(canonical, fmt) if out.client_binary else out.codec.to_text(canonical, fmt)
    except (ValueError, struct.error, ProxyError):
        raise RowDecryptError(out.column, "the decrypted value is not valid for the column's type") from None


def _first(plan: RowPlan) -> ProtectedColumn:
    for out in plan:
        if out is not None:
            return out.column
    raise AssertionError("a row plan without protected columns is never used")
