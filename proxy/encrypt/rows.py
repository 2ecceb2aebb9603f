"""The per-row hot path: one function that takes a whole DataRow body and a column plan and returns the
rewritten body, and its batch form for a run of DataRow messages, which is what the relay calls.
Everything per row that touches protected values happens here and nowhere else, so a native kernel can
replace :func:`rewrite_data_rows` and :func:`rewrite_data_row` without touching the rest of the proxy.

DataRow body (PostgreSQL docs, "Message Formats", DataRow)::

    Int16   number of columns
    then per column:
    Int32   length of the value in bytes (-1: NULL, no bytes follow)
    Byte_n  the value, in the format the portal asked for

A protected column's value from the server is a v1 envelope (see :mod:`keymgmt.envelope`): raw bytes when
the proxy asked for binary, ``\\x`` followed by hex when the result is in text format (simple queries).
NULL stays NULL. The value is decrypted, and the canonical plaintext is encoded with the declared type's
codec in the format the client asked for. Unprotected columns are copied as they are.

Two loops do the work, chosen once per plan: a fast one for the common case (every protected column
comes as a raw envelope and goes out as its canonical bytes: text-like types, extended protocol, a UTF8
client) and a general one for everything else. They make the same checks and give the same bytes; the
unit tests hold them to that.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag

from keymgmt.envelope import HEADER_LENGTH, MIN_LENGTH, DataKey, KeyState
from proxy.errors import ProxyError
from proxy.pgtypes.base import SessionFormat, TypeCodec
from proxy.pgtypes.bytea import BYTEA
from proxy.protocol.codec import CodecError
from proxy.rewrite.catalog import ProtectedColumn

_I32 = struct.Struct("!i")
_FRAME = struct.Struct("!cI")  # message type, length
_ROW = struct.Struct("!BIh")  # message type, length, column count: a DataRow's first 7 bytes
_ASCII_FORMAT = SessionFormat()  # escape-format bytea output is ASCII: the client encoding does not matter
_PREFIX_LEN = 4  # magic · version · algorithm
_PREFIX_V1 = b"PV\x01\x01"
_KEY_END = 20
# Length fields packed ahead for the fast loop (packing is its fallback for longer values): it saves
# about 4 % of the loop's time, for some 50 KiB.
_LENGTHS = tuple(_I32.pack(n) for n in range(1024))


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
            return binascii.a2b_hex(value[2:])  # strict: PostgreSQL writes no spaces, no odd length
        return BYTEA.canonical_from_text(value, _ASCII_FORMAT)
    except (ValueError, ProxyError):  # binascii.Error and UnicodeDecodeError are ValueErrors
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

    ``memo`` is the result's cache (see :func:`rewrite_data_rows`): the caller shares it between the
    rows of one result and drops it when a new result starts, so a key disabled or destroyed meanwhile
    is looked up again then."""
    # One kernel for both forms: the body is framed, which costs a copy but keeps a single loop to trust.
    framed = _FRAME.pack(b"D", len(body) + 4) + body
    out = rewrite_data_rows(framed, 0, len(framed), plan, keys, fmt, {} if memo is None else memo)
    return body if out is framed else out[5:]


def rewrite_data_rows(
    data: bytes, start: int, end: int, plan: RowPlan, keys: KeyLookup, fmt: SessionFormat, memo: dict[bytes, Any]
) -> bytes:
    """A run of consecutive, complete DataRow messages (type byte and length included) in
    ``data[start:end]``, rewritten: the batch form of :func:`rewrite_data_row`, which saves the per-message
    dispatch of the relay. Returns the framed messages.

    ``memo`` belongs to one result (one plan): it holds the plan compiled for the loops below and, per
    key seen, the key's decrypt function under the envelope's first 20 bytes (magic · version ·
    algorithm · key id), which are only stored once the key was found and enabled."""
    compiled = memo.get(b"")
    if compiled is None or compiled[0] is not plan:
        compiled = memo[b""] = _compile(plan)
    try:
        if compiled[2] is not None:
            return _rewrite_fast(data, start, end, plan, compiled[2], keys, memo)
        return _rewrite_general(data, start, end, plan, compiled[1], keys, fmt, memo)
    except struct.error:
        raise CodecError("server", "malformed DataRow message") from None


# A protected column, compiled: (output, associated bytes, the server sends the raw envelope, the
# canonical bytes are the client's value). None for a column that is copied as it is.
_Step = tuple[ColumnOutput, bytes, bool, bool] | None
# (plan, its steps, or when every protected column is binary and identity: its associated bytes per
# column, None for the others, which is all the fast loop needs).
_Compiled = tuple[RowPlan, tuple[_Step, ...], tuple[bytes | None, ...] | None]


def _compile(plan: RowPlan) -> _Compiled:
    steps = tuple(
        None
        if out is None
        # A fixed-width type is never passed through as it is: _encode checks its width.
        else (out, out.associated, out.server_binary, out.identity and out.codec.typlen <= 0)
        for out in plan
    )
    fast = all(step is None or (step[2] and step[3]) for step in steps)
    return plan, steps, tuple(None if step is None else step[1] for step in steps) if fast else None


# The loops below are written for speed: they run once per protected value, and what they do there is
# most of the proxy's CPU on a protected result. They work on offsets into ``data`` (no per-row or
# per-envelope copies) and leave everything rare (error reporting, key lookups) to helpers. The checks
# are open_value's, inlined: the value fits in its row, the envelope's prefix and minimum length, an
# enabled key, and AES-GCM verifies the tag (associated data: header · column's bytes) before anything
# is returned. A row must hold exactly the plan's columns and end at its last value. Nothing is emitted
# for a run that fails: the caller gets an exception, never partial output.


def _rewrite_fast(
    data: bytes,
    start: int,
    end: int,
    plan: RowPlan,
    associated_data: tuple[bytes | None, ...],
    keys: KeyLookup,
    memo: dict[bytes, Any],
) -> bytes:
    """Every protected column comes from the server as a raw envelope and goes to the client as its
    canonical bytes, so a value's new length is its envelope's minus the envelope overhead."""
    ncols = len(associated_data)
    unpack_row = _ROW.unpack_from
    unpack = _I32.unpack_from
    pack = _I32.pack
    lengths = _LENGTHS
    memo_get = memo.get
    parts: list[bytes] = []
    append = parts.append
    copied = start  # data[start:copied] is in parts
    head = 0  # where the current row's new message header goes in parts
    pos = start
    while pos < end:
        kind, ln, count = unpack_row(data, pos)
        row_end = pos + 1 + ln
        if kind != 0x44 or ln < 6 or row_end > end:
            raise struct.error("not a complete DataRow")
        if count != ncols:
            raise RowDecryptError(_first(plan), "the row does not match its description")
        p = pos + 7  # the first column's length
        shrink = 0
        for associated in associated_data:
            (n,) = unpack(data, p)
            if associated is None or n < 0:
                p += 4 + (n if n > 0 else 0)
                continue
            v = p + 4
            value_end = v + n
            if value_end > row_end:
                raise struct.error("a value runs past the end of its row")
            if n < MIN_LENGTH:
                raise RowDecryptError(_column_at(data, pos, p, plan), "the stored value is not an envelope")
            k = v + _KEY_END
            h = v + HEADER_LENGTH
            decrypt = memo_get(data[v:k])
            if decrypt is None:
                decrypt = _decrypt_function(data[v:k], _column_at(data, pos, p, plan), keys, memo)
            try:
                canonical = decrypt(data[k:h], data[h:value_end], data[v:h] + associated)
            except InvalidTag:
                raise RowDecryptError(_column_at(data, pos, p, plan), "the value failed authentication") from None
            if not shrink:  # the row's first rewritten value: its header is rewritten once the row is done
                if copied < pos:
                    append(data[copied:pos])
                head = len(parts)
                append(b"")
                copied = pos + 5
            if copied < p:
                append(data[copied:p])
            try:
                append(lengths[n - MIN_LENGTH])  # the canonical bytes' length: n >= MIN_LENGTH here
            except IndexError:
                append(pack(n - MIN_LENGTH))
            append(canonical)
            shrink += MIN_LENGTH
            p = copied = value_end
        if p != row_end:
            _misfit(data, pos, row_end, plan)
        if shrink:
            parts[head] = _FRAME.pack(b"D", ln - shrink)
        pos = row_end
    if copied == start:
        return data[start:end]
    if copied < end:
        append(data[copied:end])
    return b"".join(parts)


def _rewrite_general(
    data: bytes,
    start: int,
    end: int,
    plan: RowPlan,
    steps: tuple[_Step, ...],
    keys: KeyLookup,
    fmt: SessionFormat,
    memo: dict[bytes, Any],
) -> bytes:
    """Any plan: envelopes in bytea text form (simple queries), codecs, fixed-width types."""
    ncols = len(steps)
    unpack_row = _ROW.unpack_from
    unpack = _I32.unpack_from
    pack = _I32.pack
    memo_get = memo.get
    parts: list[bytes] = []
    append = parts.append
    copied = start
    pos = start
    while pos < end:
        kind, ln, count = unpack_row(data, pos)
        row_end = pos + 1 + ln
        if kind != 0x44 or ln < 6 or row_end > end:
            raise struct.error("not a complete DataRow")
        if count != ncols:
            raise RowDecryptError(_first(plan), "the row does not match its description")
        p = pos + 7
        shrink = 0
        head = -1
        for step in steps:
            (n,) = unpack(data, p)
            if step is None or n < 0:
                p += 4 + (n if n > 0 else 0)
                continue
            v = p + 4
            value_end = v + n
            if value_end > row_end:
                raise struct.error("a value runs past the end of its row")
            out, associated, server_binary, identity = step
            if server_binary:
                envelope, e, size = data, v, n
            else:
                envelope, e = _decode_hex(data[v:value_end], out), 0
                size = len(envelope)
            if size < MIN_LENGTH:
                raise RowDecryptError(out.column, "the stored value is not an envelope")
            k = e + _KEY_END
            h = e + HEADER_LENGTH
            decrypt = memo_get(envelope[e:k])
            if decrypt is None:
                decrypt = _decrypt_function(envelope[e:k], out.column, keys, memo)
            try:
                canonical = decrypt(envelope[k:h], envelope[h : e + size], envelope[e:h] + associated)
            except InvalidTag:
                raise RowDecryptError(out.column, "the value failed authentication") from None
            encoded = canonical if identity else _encode(canonical, out, fmt)
            if head < 0:
                if copied < pos:
                    append(data[copied:pos])
                head = len(parts)
                append(b"")
                copied = pos + 5
            if copied < p:
                append(data[copied:p])
            append(pack(len(encoded)))
            append(encoded)
            shrink += n - len(encoded)
            p = copied = value_end
        if p != row_end:
            _misfit(data, pos, row_end, plan)
        if head >= 0:
            parts[head] = _FRAME.pack(b"D", ln - shrink)
        pos = row_end
    if copied == start:
        return data[start:end]
    if copied < end:
        append(data[copied:end])
    return b"".join(parts)


def _decrypt_function(prefix: bytes, column: ProtectedColumn, keys: KeyLookup, memo: dict[bytes, Any]) -> Any:
    """The decrypt function of the key an envelope names, remembered under the envelope's prefix."""
    if prefix[:_PREFIX_LEN] != _PREFIX_V1:
        raise RowDecryptError(column, "the stored value is not an envelope")
    key = keys(prefix[_PREFIX_LEN:])
    if key is None:
        raise RowDecryptError(column, "the value's data key is unknown or destroyed")
    if key.state is not KeyState.ENABLED:
        raise RowDecryptError(column, "the value's data key is disabled")
    decrypt = memo[prefix] = key._aead.decrypt
    return decrypt


def _column_at(data: bytes, pos: int, p: int, plan: RowPlan) -> ProtectedColumn:
    """The column whose length field is at ``p`` in the row at ``pos`` (already read up to there)."""
    q = pos + 7
    for out in plan:
        if q == p and out is not None:
            return out.column
        (n,) = _I32.unpack_from(data, q)
        q += 4 + (n if n > 0 else 0)
    raise AssertionError("no protected column at this position")


def _misfit(data: bytes, pos: int, row_end: int, plan: RowPlan) -> NoReturn:
    """Raises for a row whose values do not end where it does. The loops read lengths without a bound
    (a value they open is always checked to lie in its row), so this walk decides the error: a length
    field past the row's end is a malformed message, anything else a row that does not fit its plan."""
    q = pos + 7
    for _ in plan:
        if q + 4 > row_end:
            raise struct.error("a length runs past the end of its row")
        (n,) = _I32.unpack_from(data, q)
        q += 4 + (n if n > 0 else 0)
    raise RowDecryptError(_first(plan), "the row does not match its description")


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
