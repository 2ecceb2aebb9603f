"""The per-row hot path: one function that takes a whole DataRow body and a column plan and returns the
rewritten body, and its batch form for a run of DataRow messages, which is what the relay calls.
Everything per row that touches protected values happens here and nowhere else, so a native kernel can
replace :func:`rewrite_data_rows` and :func:`rewrite_data_row` without touching the rest of the proxy.

DataRow body (PostgreSQL docs, "Message Formats", DataRow)::

    Int16   number of columns
    then per column:
    Int32   length of the value in bytes (-1: NULL, no bytes follow)
    Byte_n  the value, in the format the portal asked for

A governed column's value is turned into what the session's role may see, one :class:`Action` per
result column, chosen once per statement (never per row):

* ``DECRYPT``: the value from the server is a v1 envelope (see :mod:`keymgmt.envelope`): raw bytes when
  the proxy asked for binary, ``\\x`` followed by hex when the result is in text format (simple
  queries). It is decrypted, and the canonical plaintext is encoded with the declared type's codec in
  the format the client asked for;
* ``MASK``: the same, with the column's mask applied to the canonical plaintext before it is encoded
  (a mask without a valid form for the value gives NULL);
* ``NULL``: NULL, whatever the server sent; nothing is opened (a hidden column);
* ``STORED``: the server's bytes as they are (the stored envelope for a ciphertext role, a plain column
  for a plaintext role);
* ``DECODE_MASK``: a plain column's value, decoded from the server's format with the declared type's
  codec, masked, and encoded again;
* ``SCREEN``: a result column pgveil cannot attribute to a governed column, in a result served to a role
  that may not see some encrypted column: a value that carries a pgveil envelope (see
  :func:`carries_envelope`) becomes NULL, any other value is copied as it is.

NULL stays NULL. Columns without a plan entry are copied as they are.

Every envelope is opened through :class:`keymgmt.envelope.Opener`, the one decrypt boundary: this module
knows the DataRow format, not the envelope's. A value that does not open ends the run in
:class:`RowDecryptError`, which names the column and carries a bounded ``reason`` for the log and the
metrics; the client only learns that the column's value could not be decrypted.

Three kernels do the work, chosen once per plan, and make the same checks and give the same bytes (the
unit tests hold them to that, on every fault at every row and column):

* the accelerator's (``pgveil_accel.rewrite_rows``, C), when it is built and every protected column's
  canonical bytes are what the client gets (text-like types to a UTF8 client, either format), whether
  the server sends raw envelopes (extended protocol) or bytea hex text (simple queries);
* a fast Python loop for the common case (raw envelopes in, canonical bytes out);
* a general Python loop for everything else (codecs, fixed-width types, escape-format bytea).
"""

from __future__ import annotations

import binascii
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NoReturn

from keymgmt import native
from keymgmt.envelope import (
    ALGORITHM_AES256GCM,
    MAGIC,
    MIN_LENGTH,
    NATIVE_SUBJECT_KEYS,
    VERSION_1,
    Opener,
    OpenFailed,
    OpenFailure,
    Subject,
)
from keymgmt.envelope import KeyLookup as KeyLookup  # re-exported: callers pass keymgmt's lookup
from proxy.encrypt.subjects import InvalidSubject, subject_from_binary, subject_from_text
from proxy.errors import ProxyError
from proxy.pgtypes.base import SessionFormat, TypeCodec
from proxy.pgtypes.bytea import BYTEA
from proxy.policy.masks import native_form
from proxy.protocol.codec import CodecError
from proxy.rewrite.catalog import ProtectedColumn, SubjectColumn

_I32 = struct.Struct("!i")
_FRAME = struct.Struct("!cI")  # message type, length
_ROW = struct.Struct("!BIh")  # message type, length, column count: a DataRow's first 7 bytes
_accel: Any = native.accel  # the accelerator module, or None: see keymgmt.native
_ASCII_FORMAT = SessionFormat()  # escape-format bytea output is ASCII: the client encoding does not matter
# Length fields packed ahead for the fast loop (packing is its fallback for longer values): it saves
# about 4 % of the loop's time, for some 50 KiB.
_LENGTHS = tuple(_I32.pack(n) for n in range(1024))
_NULL_LENGTH = _I32.pack(-1)

Mask = Callable[[bytes], bytes | None]
"""A compiled mask (proxy.policy.masks.compile_mask): canonical bytes of the declared type in, the
masked value's canonical bytes out, or None for NULL."""


class Action(IntEnum):
    """What one governed result column becomes (see the module docstring)."""

    DECRYPT = 0
    MASK = 1
    NULL = 2
    STORED = 3
    DECODE_MASK = 4
    SCREEN = 5


@dataclass(frozen=True, slots=True)
class ColumnOutput:
    """How one governed result column is turned into what the client may see."""

    column: ProtectedColumn
    codec: TypeCodec
    associated: bytes  # keymgmt.envelope.column_associated_data(column.column_id)
    # DECRYPT, MASK: the server sends the raw envelope (binary) rather than bytea hex text. DECODE_MASK:
    # the server sends the declared type's binary format rather than its text.
    server_binary: bool
    client_binary: bool  # the client asked for the declared type's binary format
    # The canonical bytes are already what the client gets (text-like types to a UTF8 client, in either
    # format): the hot path then skips the codec call.
    identity: bool = False
    action: Action = Action.DECRYPT
    mask: Mask | None = None  # set for MASK and DECODE_MASK
    whole: bool = False  # SCREEN: the column is a bytea, whose envelope can only be the whole value
    # Per-subject keys: the result position of the same row's subject column (-1: not in the result),
    # the table's subject column and name, and whether the server sends that column in binary. When set,
    # each value's key must belong to the subject the row names (a value moved to another subject's row
    # fails like a tampered one).
    subject_at: int = -1
    subject: SubjectColumn | None = None
    subject_table: str = ""
    subject_binary: bool = False

    def __post_init__(self) -> None:
        if (self.mask is not None) != (self.action in (Action.MASK, Action.DECODE_MASK)):
            raise ValueError("a mask is given exactly for the MASK and DECODE_MASK actions")


RowPlan = tuple[ColumnOutput | None, ...]

UNATTRIBUTED = ProtectedColumn("", "", "", "bytea", identity="an unattributed result column", encrypted=False)
"""The ``column`` of a SCREEN entry: no governed column (a row that does not fit its plan names it)."""

_PREFIX = MAGIC + bytes((VERSION_1, ALGORITHM_AES256GCM))
_HEX_MARK = b"\\x" + _PREFIX.hex().encode()
# Escape output (bytea_output = escape) of the header: PV\001\001, with each backslash doubled once per
# level of quoting it is nested in (an array's or record's text, a JSON string of one, ...).
_ESCAPE_MARK = re.compile(rb"PV\\+001\\+001")
ENVELOPE_MARKS: tuple[bytes, ...] = (
    _PREFIX,  # raw, in any binary value (bytea, an array or record of them)
    _HEX_MARK,  # hex output (\x…), also with the backslash doubled in an array's text or a JSON string
    rb"PV\001\001",  # escape output; nested, with the backslashes doubled per level (see carries_envelope)
)
"""What a pgveil envelope looks like inside a value, in the forms PostgreSQL's output functions give it:
the raw header prefix, the hex of it after its backslash, and escape format (alone and quoted, at any
depth, in arrays, records and JSON). ``encode(x, 'base64')`` or any other transformation done by server
code is not recognised."""


def carries_envelope(value: bytes, whole: bool = False) -> bool:
    """Whether ``value`` (a result value in either format) contains a pgveil envelope in one of the forms of
    :data:`ENVELOPE_MARKS`. ``whole``: the value is a ``bytea``, which carries an envelope only as all of
    it, so only its start counts (a file or a hash that holds the header's bytes somewhere is innocent)."""
    return _carries(value, 0, len(value), whole)


def _carries(data: bytes, start: int, end: int, whole: bool) -> bool:
    if whole:
        return (
            data.startswith(_PREFIX, start, end)
            or data.startswith(_HEX_MARK, start, end)
            or _ESCAPE_MARK.match(data, start, end) is not None
        )
    return (
        data.find(_PREFIX, start, end) >= 0
        or data.find(_HEX_MARK, start, end) >= 0
        or (data.find(b"PV\\", start, end) >= 0 and _ESCAPE_MARK.search(data, start, end) is not None)
    )


def screen_output(server_binary: bool, whole: bool = False) -> ColumnOutput:
    """The row plan entry of an unattributed result column to screen for envelopes (``whole``: a ``bytea``
    column, see :func:`carries_envelope`)."""
    return ColumnOutput(UNATTRIBUTED, BYTEA, b"", server_binary, server_binary, action=Action.SCREEN, whole=whole)


# Why a row could not be delivered, beyond keymgmt's OpenFailure: the decrypted value is not one of the
# declared type, or the row does not have the shape of its description.
INVALID_FOR_TYPE = "invalid_for_type"
ROW_SHAPE = "row_shape"
REASONS: tuple[str, ...] = (*(r.value for r in OpenFailure), INVALID_FOR_TYPE, ROW_SHAPE)
"""Every ``RowDecryptError.reason``: a bounded set, fit for a metric label."""


class RowDecryptError(Exception):
    """A protected value in a row could not be delivered; ``column`` says which, ``reason`` (one of
    :data:`REASONS`) why, for the log and the metrics only. Carries no value bytes."""

    def __init__(self, column: ProtectedColumn, reason: str) -> None:
        super().__init__(f"a value of {column.column_id} could not be decrypted ({reason})")
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
        raise RowDecryptError(out.column, OpenFailure.NOT_AN_ENVELOPE.value) from None


def open_value(envelope: bytes, out: ColumnOutput, keys: KeyLookup) -> bytes:
    """The canonical plaintext of one stored value."""
    try:
        python = out.column.subject_kind is not None and not NATIVE_SUBJECT_KEYS
        return Opener(keys, python=python).open(envelope, 0, len(envelope), out.associated)
    except OpenFailed as e:
        raise RowDecryptError(out.column, e.reason.value) from None


def rewrite_value_text(stored: bytes, out: ColumnOutput, keys: KeyLookup, fmt: SessionFormat) -> bytes | None:
    """One stored value in text form (as COPY TO sends it: bytea ``\\x…`` for an encrypted column, the
    declared type's text for a plain one) to what the client gets in text form, None for NULL."""
    action = out.action
    if action is Action.NULL:
        return None
    if action is Action.STORED:
        return stored
    if action is Action.DECODE_MASK:
        try:
            canonical = out.codec.canonical_from_text(stored, fmt)
        except (ValueError, ProxyError):
            raise RowDecryptError(out.column, INVALID_FOR_TYPE) from None
    else:
        canonical = open_value(_decode_hex(stored, out), out, keys)
    if out.mask is not None:
        masked = out.mask(canonical)
        if masked is None:
            return None
        canonical = masked
    try:
        return out.codec.to_text(canonical, fmt)
    except (ValueError, ProxyError):
        raise RowDecryptError(out.column, INVALID_FOR_TYPE) from None


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

    ``memo`` belongs to one result (one plan): it holds the plan compiled for the kernels below (under
    ``b""``) and the result's :class:`~keymgmt.envelope.Opener` (under ``b"o"``), which remembers the keys
    it found enabled."""
    compiled = memo.get(b"")
    if compiled is None or compiled[0] is not plan:
        compiled = memo[b""] = _compile(plan)
    if compiled[4]:
        return data[start:end]  # nothing to change: every governed column is passed on as stored
    opener = memo.get(b"o")
    # A bound method is a new object at each access: compare. A shared (native) Opener is not used for
    # subject keys by an accelerator build that cannot add their associated data.
    if opener is None or opener[0] != keys or (compiled[5] and opener[1].native is not None):
        opener = memo[b"o"] = (keys, Opener(keys, python=compiled[5]))
    if compiled[6]:
        try:
            _check_subjects(data, start, end, compiled[6], keys, memo)
        except (struct.error, IndexError):
            raise CodecError("server", "malformed DataRow message") from None
    try:
        if compiled[3] is not None and opener[1].native is not None and type(data) is bytes:
            try:
                return _rewrite_native(data, start, end, plan, compiled[3], opener[1])
            except _Unsupported:
                pass  # escape-format bytea text, a mask longer than its stored value: the general loop
        if compiled[2] is not None:
            return _rewrite_fast(data, start, end, plan, compiled[2], opener[1].open)
        return _rewrite_general(data, start, end, plan, compiled[1], opener[1].open, fmt)
    except struct.error:
        raise CodecError("server", "malformed DataRow message") from None


# A governed column, compiled: (output, associated bytes, the server sends the raw envelope (or a plain
# column's binary form), the canonical bytes are the client's value, the action). None for a column that
# is copied as it is (no plan entry, or STORED).
_Step = tuple[ColumnOutput, bytes, bool, bool, Action] | None
# What the accelerator's kernel takes per column: None (copied), False (NULL, nothing read), or
# (associated bytes, the server sends the raw envelope rather than bytea hex text[, the mask[, its native
# code, the fixed bytes]]) (see proxy.policy.masks.native_form).
_NativeColumn = tuple[bytes, bool] | tuple[bytes, bool, Mask] | tuple[bytes, bool, Mask, int, bytes] | int | None
_NativeColumns = tuple[_NativeColumn, ...]
# (plan, its steps, the fast loop's columns, the accelerator's columns, nothing to change). The fast
# loop's columns, when every decrypted column is binary and identity and no column is masked: the
# associated bytes of each decrypted column, _HIDE for a NULL column, None for the others. The
# accelerator's the same when every decrypted column is identity (see _NativeColumns).
# (plan, steps, the fast loop's columns, the accelerator's columns, nothing to change, some column has
# per-subject keys: its values open with the Python Opener, which adds each key's subject to the
# associated data; the accelerator's kernel does not know subject keys yet).
_Compiled = tuple[
    RowPlan,
    tuple[_Step, ...],
    tuple[bytes | None, ...] | None,
    _NativeColumns | None,
    bool,
    bool,
    tuple[tuple[int, "ColumnOutput"], ...],  # the values whose row's subject column is in the result
]
_OpenFunction = Callable[[bytes, int, int, bytes], bytes]
# The fast loop's mark for a column that goes out as NULL; compared by identity (associated data is never
# empty, so no column's associated bytes are this object).
_HIDE = b""
# The accelerator's kernel knows NULL and masked columns from its version 2 on (an older build of the
# module leaves such plans to the Python loops).
_NATIVE_NULL = bool(getattr(_accel, "NULL_COLUMNS", 0))
_NATIVE_MASK = bool(getattr(_accel, "MASK_COLUMNS", 0))
# From its version 3 on, the kernel applies the text masks itself (masks.native_form), calling the
# function only for a value that is not valid UTF-8 (its error is the function's).
_NATIVE_TEXT_MASKS = bool(getattr(_accel, "TEXT_MASKS", 0))
# From its version 4 on, it screens unattributed columns for envelopes (a True column; 2 for a bytea
# column, whose envelope can only be the whole value); SCREEN_COLUMNS 2: nested escape forms too.
_NATIVE_SCREEN = getattr(_accel, "SCREEN_COLUMNS", 0) >= 2


def _native_column(step: _Step) -> _NativeColumn:
    if step is None:
        return None
    out, associated, server_binary, _identity, action = step
    if action is Action.NULL:
        return False
    if action is Action.SCREEN:
        return 2 if out.whole else True
    if action is Action.MASK:
        assert out.mask is not None
        form = native_form(out.mask) if _NATIVE_TEXT_MASKS else None
        if form is not None:
            return (associated, server_binary, out.mask, form[0], form[1])
        return (associated, server_binary, out.mask)
    return (associated, server_binary)


class _Unsupported(Exception):
    """The accelerator met a value form it leaves to the general loop (escape-format bytea)."""


def _compile(plan: RowPlan) -> _Compiled:
    steps = tuple(
        None
        if out is None or out.action is Action.STORED
        # A fixed-width type is never passed through as it is: _encode checks its width.
        else (out, out.associated, out.server_binary, out.identity and out.codec.typlen <= 0, out.action)
        for out in plan
    )
    decrypting = [step for step in steps if step is not None and step[4] not in (Action.NULL, Action.SCREEN)]
    only_decrypt = all(step[4] is Action.DECRYPT for step in decrypting)
    hides = any(step is not None and step[4] is Action.NULL for step in steps)
    screens = any(step is not None and step[4] is Action.SCREEN for step in steps)
    fast = only_decrypt and all(step[2] and step[3] for step in decrypting) and not screens
    masks = any(step[4] is Action.MASK for step in decrypting)
    # An accelerator build that cannot add a subject key's associated data leaves such plans to Python.
    subjects = not NATIVE_SUBJECT_KEYS and any(step[0].column.subject_kind is not None for step in decrypting)
    native = (
        all(step[4] in (Action.DECRYPT, Action.MASK) and step[3] for step in decrypting)
        and not subjects
        and _accel is not None
        and (_NATIVE_NULL or not hides)
        and (_NATIVE_MASK or not masks)
        and (_NATIVE_SCREEN or not screens)
    )
    return (
        plan,
        steps,
        tuple(None if step is None else _HIDE if step[4] is Action.NULL else step[1] for step in steps)
        if fast
        else None,
        tuple(_native_column(step) for step in steps) if native else None,
        all(step is None for step in steps),
        subjects,
        tuple(
            (i, out)
            for i, out in enumerate(plan)
            if out is not None and out.subject_at >= 0 and out.action in (Action.DECRYPT, Action.MASK)
        ),
    )


def run_key_ids(data: bytes, start: int, end: int, plan: RowPlan) -> list[bytes]:
    """The key ids of the envelopes a run of DataRows holds in the columns ``plan`` opens (each once, in
    order), so that the keys a result needs and memory lacks can be fetched in one keystore query.
    Values that are not framed like envelopes are skipped (the kernels report them)."""
    opened = [
        (i, out.server_binary)
        for i, out in enumerate(plan)
        if out is not None and out.action in (Action.DECRYPT, Action.MASK)
    ]
    found: dict[bytes, None] = {}
    if not opened:
        return []
    unpack = _I32.unpack_from
    pos = start
    try:
        while pos < end:
            (length,) = unpack(data, pos + 1)
            p = pos + 7
            offsets: list[tuple[int, int]] = []
            for _ in range(int.from_bytes(data[pos + 5 : pos + 7], "big", signed=True)):
                (n,) = unpack(data, p)
                offsets.append((p + 4, n))
                p += 4 + max(n, 0)
            for i, binary in opened:
                if i >= len(offsets):
                    continue
                v, n = offsets[i]
                if binary and n >= MIN_LENGTH and data[v : v + 4] == _PREFIX:
                    found[data[v + 4 : v + 20]] = None
                elif not binary and n >= 2 + 2 * MIN_LENGTH and data[v : v + 10] == _HEX_PREFIX:
                    try:
                        found[binascii.a2b_hex(data[v + 10 : v + 42])] = None
                    except ValueError:
                        pass
            pos += 1 + length
    except struct.error:
        pass  # a malformed run: the kernels report it
    return list(found)


_HEX_PREFIX = b"\\x" + _PREFIX.hex().encode()


def _check_subjects(
    data: bytes,
    start: int,
    end: int,
    checks: tuple[tuple[int, ColumnOutput], ...],
    keys: KeyLookup,
    memo: dict[bytes, Any],
) -> None:
    """Each checked value's key must be the key of the data subject its row names (its subject column,
    in the same result): a value copied into another subject's row is refused as a value that does not
    open. A key that is a column's (written before the table had subject keys) or not found here (the
    kernel then fails it) is left to the kernel. Raises the key lookup's KeyMiss before anything is
    written, so the run can be retried."""
    unpack = _I32.unpack_from
    pos = start
    while pos < end:
        (length,) = unpack(data, pos + 1)
        row_end = pos + 1 + length
        offsets: list[tuple[int, int]] = []
        p = pos + 7
        for _ in range(int.from_bytes(data[pos + 5 : pos + 7], "big", signed=True)):
            (n,) = unpack(data, p)
            offsets.append((p + 4, n))
            p += 4 + max(n, 0)
        for i, out in checks:
            v, n = offsets[i]
            if n < 0:
                continue
            if out.server_binary:
                key_id = data[v + 4 : v + 20] if n >= MIN_LENGTH else b""
            else:
                try:
                    key_id = binascii.a2b_hex(data[v + 10 : v + 42]) if data[v : v + 2] == b"\\x" else b""
                except ValueError:
                    key_id = b""
            if len(key_id) != 16:
                continue  # not an envelope: the kernel says so
            key = keys(key_id)
            expected = None if key is None else key.data_subject
            if expected is None:
                continue
            s, sn = offsets[out.subject_at]
            named = None
            if sn >= 0 and out.subject is not None:
                raw = data[s : s + sn]
                # The canonical subject of each distinct raw id, remembered for the result (bounded).
                cache: dict[tuple[bytes, bool, int], Subject | None] = memo.setdefault(b"s", {})
                ck = (raw, out.subject_binary, id(out.subject))
                if ck in cache:
                    named = cache[ck]
                else:
                    try:
                        named = (
                            subject_from_binary(out.subject_table, out.subject, raw)
                            if out.subject_binary
                            else subject_from_text(out.subject_table, out.subject, raw)
                        )
                    except InvalidSubject:
                        named = None
                    if len(cache) > 4096:
                        cache.clear()
                    cache[ck] = named
            if named != expected:
                raise RowDecryptError(out.column, OpenFailure.AUTHENTICATION.value)
        pos = row_end


def _rewrite_native(data: bytes, start: int, end: int, plan: RowPlan, columns: _NativeColumns, opener: Opener) -> bytes:
    """The accelerator's kernel, its errors turned into this module's (see pgveil_accel.c)."""
    try:
        return _accel.rewrite_rows(data, start, end, columns, opener.native)  # type: ignore[no-any-return]
    except _accel.RowRefused as e:
        reason, index = e.args
        out = plan[index] if index >= 0 else None
        raise RowDecryptError(_first(plan) if out is None else out.column, reason) from None
    except _accel.Malformed:
        raise struct.error("malformed DataRow") from None
    except _accel.Unsupported:
        raise _Unsupported() from None


# The loops below are written for speed: they run once per protected value, and what they do there is
# most of the proxy's CPU on a protected result. They work on offsets into ``data`` (no per-row or
# per-envelope copies) and leave everything rare (error reporting) to helpers. Each value is checked to
# fit in its row, then the Opener makes the envelope's checks (minimum length, prefix, an enabled key,
# the tag over header · column's associated data) before anything is returned. A row must hold exactly
# the plan's columns and end at its last value. Nothing is emitted for a run that fails: the caller gets
# an exception, never partial output.


def _rewrite_fast(
    data: bytes,
    start: int,
    end: int,
    plan: RowPlan,
    associated_data: tuple[bytes | None, ...],
    open_: _OpenFunction,
) -> bytes:
    """Every decrypted column comes from the server as a raw envelope and goes to the client as its
    canonical bytes, so a value's new length is its envelope's minus the envelope overhead; a hidden
    column (``_HIDE``) becomes NULL unread."""
    ncols = len(associated_data)
    unpack_row = _ROW.unpack_from
    unpack = _I32.unpack_from
    pack = _I32.pack
    lengths = _LENGTHS
    hide = _HIDE
    null_length = _NULL_LENGTH
    parts: list[bytes] = []
    append = parts.append
    copied = start  # data[start:copied] is in parts
    pos = start
    while pos < end:
        kind, ln, count = unpack_row(data, pos)
        row_end = pos + 1 + ln
        if kind != 0x44 or ln < 6 or row_end > end:
            raise struct.error("not a complete DataRow")
        if count != ncols:
            raise RowDecryptError(_first(plan), ROW_SHAPE)
        p = pos + 7  # the first column's length
        shrink = 0
        head = -1  # where the row's new message header goes in parts, once a value of it is rewritten
        for associated in associated_data:
            (n,) = unpack(data, p)
            if associated is None or n < 0:
                p += 4 + (n if n > 0 else 0)
                continue
            v = p + 4
            value_end = v + n
            if value_end > row_end:
                raise struct.error("a value runs past the end of its row")
            if associated is hide:
                canonical = None
            else:
                try:
                    canonical = open_(data, v, value_end, associated)
                except OpenFailed as e:
                    raise RowDecryptError(_column_at(data, pos, p, plan), e.reason.value) from None
            if head < 0:  # the row's first rewritten value: its header is rewritten once the row is done
                if copied < pos:
                    append(data[copied:pos])
                head = len(parts)
                append(b"")
                copied = pos + 5
            if copied < p:
                append(data[copied:p])
            if canonical is None:
                append(null_length)
                shrink += n
            else:
                try:
                    append(lengths[n - MIN_LENGTH])  # the canonical bytes' length: n >= MIN_LENGTH here
                except IndexError:
                    append(pack(n - MIN_LENGTH))
                append(canonical)
                shrink += MIN_LENGTH
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


def _rewrite_general(
    data: bytes,
    start: int,
    end: int,
    plan: RowPlan,
    steps: tuple[_Step, ...],
    open_: _OpenFunction,
    fmt: SessionFormat,
) -> bytes:
    """Any plan: envelopes in bytea text form (simple queries), codecs, fixed-width types, masks."""
    ncols = len(steps)
    unpack_row = _ROW.unpack_from
    unpack = _I32.unpack_from
    pack = _I32.pack
    decrypt = Action.DECRYPT
    hidden = Action.NULL
    decode = Action.DECODE_MASK
    screen = Action.SCREEN
    carries = _carries
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
            raise RowDecryptError(_first(plan), ROW_SHAPE)
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
            out, associated, server_binary, identity, action = step
            encoded: bytes | None
            if action is screen:
                if not carries(data, v, value_end, out.whole):
                    p = value_end  # copied as it is
                    continue
                encoded = None
            elif action is hidden:
                encoded = None
            elif action is decode:
                encoded = _decode_mask(data[v:value_end], out, fmt)
            else:
                if server_binary:
                    envelope, e, size = data, v, n
                else:
                    envelope, e = _decode_hex(data[v:value_end], out), 0
                    size = len(envelope)
                try:
                    canonical = open_(envelope, e, e + size, associated)
                except OpenFailed as err:
                    raise RowDecryptError(out.column, err.reason.value) from None
                if action is not decrypt:
                    assert out.mask is not None
                    masked = out.mask(canonical)
                    encoded = None if masked is None else masked if identity else _encode(masked, out, fmt)
                else:
                    encoded = canonical if identity else _encode(canonical, out, fmt)
            if head < 0:
                if copied < pos:
                    append(data[copied:pos])
                head = len(parts)
                append(b"")
                copied = pos + 5
            if copied < p:
                append(data[copied:p])
            if encoded is None:
                append(_NULL_LENGTH)
                shrink += n
            else:
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


def _decode_mask(value: bytes, out: ColumnOutput, fmt: SessionFormat) -> bytes | None:
    """A plain column's value from the server (its declared type, in the server's format), masked and
    encoded for the client; None for NULL."""
    codec = out.codec
    try:
        if out.server_binary:
            canonical = codec.canonical_from_binary(value, fmt)
        else:
            canonical = codec.canonical_from_text(value, fmt)
    except (ValueError, struct.error, ProxyError):
        raise RowDecryptError(out.column, INVALID_FOR_TYPE) from None
    assert out.mask is not None
    masked = out.mask(canonical)
    if masked is None:
        return None
    return masked if out.identity and codec.typlen <= 0 else _encode(masked, out, fmt)


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
    raise RowDecryptError(_first(plan), ROW_SHAPE)


def _encode(canonical: bytes, out: ColumnOutput, fmt: SessionFormat) -> bytes:
    if out.codec.typlen > 0 and len(canonical) != out.codec.typlen:
        # Authentic, but not a value of the declared fixed-width type (the declaration changed?).
        raise RowDecryptError(out.column, INVALID_FOR_TYPE)
    try:
        return out.codec.to_binary(canonical, fmt) if out.client_binary else out.codec.to_text(canonical, fmt)
    except (ValueError, struct.error, ProxyError):
        raise RowDecryptError(out.column, INVALID_FOR_TYPE) from None


def _first(plan: RowPlan) -> ProtectedColumn:
    for out in plan:
        if out is not None and out.action not in (Action.STORED, Action.SCREEN):
            return out.column
    if any(out is not None and out.action is Action.SCREEN for out in plan):
        return UNATTRIBUTED
    raise AssertionError("a row plan without governed columns to rewrite is never run")
