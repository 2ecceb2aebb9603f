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

A column with per-subject keys whose row's subject column is in the same result (``subject_at``) is also
checked: each value's key must be the key of the subject that column names (see :func:`_check_subjects`,
made for each row before its values are opened, by every kernel).

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
import functools
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
    MAX_SUBJECT_ID_LENGTH,
    MIN_LENGTH,
    NATIVE_SUBJECT_KEYS,
    VERSION_1,
    KeyState,
    Opener,
    OpenFailed,
    OpenFailure,
    Subject,
    subject_associated_data,
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
    ``b""``), the result's :class:`~keymgmt.envelope.Opener` (under ``b"o"``), which remembers the keys
    it found enabled, and the Python kernels' canonical subject ids (under ``b"s"``)."""
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
    try:
        if compiled[3] is not None and opener[1].native is not None and type(data) is bytes:
            try:
                return _rewrite_native(data, start, end, plan, compiled[3], opener[1], compiled[7])
            except _Unsupported:
                pass  # escape-format bytea text, a mask longer than its stored value: the general loop
        check = subject_checker(compiled[6], keys, memo)
        if compiled[2] is not None:
            return _rewrite_fast(data, start, end, plan, compiled[2], opener[1].open, check)
        return _rewrite_general(data, start, end, plan, compiled[1], opener[1].open, fmt, check)
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
# per-subject keys and the accelerator's Opener cannot add a key's subject to the associated data (an old
# build: its values open with the Python Opener), the subject checks (see _check_subjects), and the same
# as the accelerator's kernel takes them (None: no checks)).
_Compiled = tuple[
    RowPlan,
    tuple[_Step, ...],
    tuple[bytes | None, ...] | None,
    _NativeColumns | None,
    bool,
    bool,
    tuple["_SubjectCheck", ...],
    "tuple[_NativeCheck, ...] | None",
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
# A build whose SUBJECT_CHECKS is the longest subject id keymgmt allows makes the subject checks itself
# (rewrite_rows' checks argument); with another build, plans with checks run in the Python loops.
_NATIVE_SUBJECT_CHECKS = getattr(_accel, "SUBJECT_CHECKS", 0) == MAX_SUBJECT_ID_LENGTH


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
    readers: dict[tuple[str, SubjectColumn | None, bool], _SubjectCanonical] = {}
    checks = tuple(
        _subject_check(i, out, len(plan), readers)
        for i, out in enumerate(plan)
        if out is not None and out.subject_at >= 0 and out.action in (Action.DECRYPT, Action.MASK)
    )
    native = (
        all(step[4] in (Action.DECRYPT, Action.MASK) and step[3] for step in decrypting)
        and not subjects
        and _accel is not None
        and (_NATIVE_NULL or not hides)
        and (_NATIVE_MASK or not masks)
        and (_NATIVE_SCREEN or not screens)
        and (_NATIVE_SUBJECT_CHECKS or not checks)
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
        checks,
        tuple(c.native() for c in checks) if native and checks else None,
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


# -- per-subject keys: the subject check ----------------------------------------------------------------
# A value of a column with per-subject keys, in a result that also holds its row's subject column (same
# table, see the engine's _subject_checks), must be sealed under the key of the subject that column names:
# a value copied into another subject's row is refused as one that does not open. _check_subjects is the
# reference; the accelerator's kernel makes the same checks in the same order (pgveil_accel.c,
# check_row_subjects), holding each key's subject part and making the row's id canonical natively.

# The subject column's type class (proxy.rewrite.catalog.SUBJECT_TYPES), as the accelerator knows it; 0:
# none known (the catalog is not read, or the plan has no subject column), so no id is valid.
_TYPE_CLASSES = {"integer": 1, "uuid": 2, "text": 3}
_KEY_ENABLED = KeyState.ENABLED  # a module global: enum member access costs a class lookup per value
_SubjectCanonical = Callable[[bytes], bytes | None]
# What the accelerator's kernel takes per check: (checked column, subject column, type class code, the
# server sends the subject column in binary, the kind part, the canonicaliser of text ids).
_NativeCheck = tuple[int, int, int, bool, bytes, _SubjectCanonical]


@dataclass(frozen=True, slots=True)
class _SubjectCheck:
    """One checked column of a plan: its value's key must be the key of the subject its row names."""

    index: int  # the checked (decrypted or masked) column
    out: ColumnOutput
    subject_at: int  # the row's subject column
    type_class: int  # _TYPE_CLASSES code
    binary: bool  # the server sends the subject column in binary
    # 0x00 · u16 length · kind: how a key of the table's subject kind begins its subject part
    # (keymgmt.envelope.subject_associated_data); empty when the plan names no subject column.
    kind_part: bytes
    canonical: _SubjectCanonical  # a subject id as the server sends it -> its canonical id, None if invalid

    def native(self) -> _NativeCheck:
        return (self.index, self.subject_at, self.type_class, self.binary, self.kind_part, self.canonical)


def _subject_check(
    index: int, out: ColumnOutput, width: int, readers: dict[tuple[str, SubjectColumn | None, bool], _SubjectCanonical]
) -> _SubjectCheck:
    """The check of ``out`` (at ``index``); ``readers`` shares one canonicaliser between the checks of a
    table's subject column, so that the accelerator makes a row's canonical id once for all of them."""
    if not 0 <= out.subject_at < width:
        raise ValueError("a subject check names a subject column outside the row")
    subject, table, binary = out.subject, out.subject_table, out.subject_binary
    if subject is None:
        return _SubjectCheck(index, out, out.subject_at, 0, binary, b"", _no_subject)
    kind_part = _kind_part(subject.kind)
    canonical = readers.get((table, subject, binary))
    if canonical is None:
        canonical = readers[(table, subject, binary)] = _subject_reader(table, subject, binary)
    return _SubjectCheck(
        index, out, out.subject_at, _TYPE_CLASSES.get(subject.type_class, 0), binary, kind_part, canonical
    )


@functools.lru_cache(maxsize=256)
def _kind_part(kind: str) -> bytes:
    """0x00 · u16 length · kind, from keymgmt's layout: the subject part of an empty id, less the id's length."""
    return subject_associated_data(Subject(kind, b""))[:-4]


def _subject_reader(table: str, subject: SubjectColumn, binary: bool) -> _SubjectCanonical:
    """The canonical id of a subject id as the server sends it (subjects.py), None for no id of its type."""
    read = subject_from_binary if binary else subject_from_text

    def canonical(raw: bytes) -> bytes | None:
        try:
            return read(table, subject, raw).subject_id
        except InvalidSubject:
            return None

    return canonical


def _no_subject(raw: bytes) -> bytes | None:
    return None


def subject_checker(
    checks: tuple[_SubjectCheck, ...], keys: KeyLookup, memo: dict[bytes, Any]
) -> Callable[[bytes, int, int], None] | None:
    """The Python loops' per-row subject check for a plan's checks (None when it has none); ``memo`` (the
    result's) keeps the canonical id of each distinct subject id read, bounded."""
    if not checks:
        return None
    named: dict[_SubjectCanonical, dict[bytes, bytes | None]] = memo.setdefault(b"s", {})

    def check(data: bytes, pos: int, row_end: int) -> None:
        _check_subjects(data, pos, row_end, checks, keys, named)

    return check


def _check_subjects(
    data: bytes,
    pos: int,
    row_end: int,
    checks: tuple[_SubjectCheck, ...],
    keys: KeyLookup,
    named: dict[_SubjectCanonical, dict[bytes, bytes | None]],
) -> None:
    """The subject checks of the DataRow ``data[pos:row_end]``, whose type, length and column count the
    loop has checked; made before any of its values is opened.

    The row's values are located first; a row whose lengths do not fit it exactly is not checked (the
    loop refuses it). Then per check, in order, these are not checked: a NULL value; a value that does not
    start like an envelope (raw: at least MIN_LENGTH bytes and the v1 prefix; hex text: ``\\x``, an even
    number of at least 2 * MIN_LENGTH digits whose first 40 are hex and decode to the prefix and a key id;
    escape text: decoded, as raw); a key the lookup does not give enabled (the open refuses it); a column's
    key (a value written before the table had subject keys). A subject's key must name the table's kind
    and the canonical id of the row's subject column (NULL, or no id of its type, names none): else
    RowDecryptError (authentication), as a value that does not open. The lookup's KeyMiss goes through
    before anything is written, so the run can be retried."""
    values = _row_values(data, pos, row_end)
    if values is None:
        return
    for check in checks:
        v, n = values[check.index]
        if n < 0:
            continue
        if check.out.server_binary:
            if n < MIN_LENGTH or data[v : v + 4] != _PREFIX:
                continue
            key_id = data[v + 4 : v + 20]
        else:
            prefix = _text_envelope_prefix(data, v, n)
            if prefix is None:
                continue
            key_id = prefix[4:]
        key = keys(key_id)
        if key is None or key.state is not _KEY_ENABLED:
            continue
        suffix = key.subject_associated
        if not suffix:
            continue
        s, sn = values[check.subject_at]
        expected: bytes | None = None
        if sn >= 0:
            # The subject part each distinct id names, per canonicaliser (one per table's subject column
            # and format, so one kind), remembered for the result (bounded).
            ids = named.get(check.canonical)
            if ids is None:
                ids = named[check.canonical] = {}
            raw = data[s : s + sn]
            if raw in ids:
                expected = ids[raw]
            else:
                canonical = check.canonical(raw) if check.type_class else None
                if canonical is not None:
                    expected = check.kind_part + len(canonical).to_bytes(4, "big") + canonical
                if len(ids) >= 4096:
                    ids.clear()
                ids[raw] = expected
        if suffix != expected:
            raise RowDecryptError(check.out.column, OpenFailure.AUTHENTICATION.value)


def _row_values(data: bytes, pos: int, row_end: int) -> list[tuple[int, int]] | None:
    """(offset, length) of each value of the DataRow at ``pos``, None if its lengths do not fit it exactly."""
    unpack = _I32.unpack_from
    values: list[tuple[int, int]] = []
    p = pos + 7
    for _ in range(int.from_bytes(data[pos + 5 : pos + 7], "big", signed=True)):
        if row_end - p < 4:
            return None
        (n,) = unpack(data, p)
        size = n if n > 0 else 0
        if size > row_end - p - 4:
            return None
        values.append((p + 4, n))
        p += 4 + size
    return values if p == row_end else None


def _text_envelope_prefix(data: bytes, v: int, n: int) -> bytes | None:
    """The first 20 bytes (magic · version · algorithm · key id) of the envelope that the bytea text
    ``data[v:v+n]`` holds, if it starts like one (see _check_subjects)."""
    if n >= 2 and data[v : v + 2] == b"\\x":
        if (n - 2) % 2 or (n - 2) // 2 < MIN_LENGTH:
            return None
        try:
            prefix = binascii.a2b_hex(data[v + 2 : v + 42])
        except ValueError:
            return None
    else:
        try:
            prefix = BYTEA.canonical_from_text(data[v : v + n], _ASCII_FORMAT)
        except (ValueError, ProxyError):
            return None
        if len(prefix) < MIN_LENGTH:
            return None
        prefix = prefix[:20]
    return prefix if prefix[:4] == _PREFIX else None


def _rewrite_native(
    data: bytes,
    start: int,
    end: int,
    plan: RowPlan,
    columns: _NativeColumns,
    opener: Opener,
    checks: tuple[_NativeCheck, ...] | None = None,
) -> bytes:
    """The accelerator's kernel, its errors turned into this module's (see pgveil_accel.c)."""
    try:
        if checks is None:
            return _accel.rewrite_rows(data, start, end, columns, opener.native)  # type: ignore[no-any-return]
        return _accel.rewrite_rows(data, start, end, columns, opener.native, checks)  # type: ignore[no-any-return]
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
    check: Callable[[bytes, int, int], None] | None = None,
) -> bytes:
    """Every decrypted column comes from the server as a raw envelope and goes to the client as its
    canonical bytes, so a value's new length is its envelope's minus the envelope overhead; a hidden
    column (``_HIDE``) becomes NULL unread. ``check``: the plan's subject checks (subject_checker), made
    per row before its values are opened."""
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
        if check is not None:
            check(data, pos, row_end)
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
    check: Callable[[bytes, int, int], None] | None = None,
) -> bytes:
    """Any plan: envelopes in bytea text form (simple queries), codecs, fixed-width types, masks;
    ``check`` as for _rewrite_fast."""
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
        if check is not None:
            check(data, pos, row_end)
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
