"""DataRow decryption (``rewrite_data_row``), bytes in, bytes out: fixed-key vectors for every pair of
server format (bytea hex text or raw envelope) and client format (declared type's text or binary), NULLs
and unprotected columns left alone, and every tamper, move or framing fault ending in RowDecryptError
that names the column rather than in a value the client would take for data.

Every test runs once per implementation (the ``implementation`` fixture): the pure-Python kernels, and
the accelerator's where it is built; the batch tests also run every kernel on the same input directly
and require the same outcome from each.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from keymgmt import envelope
from keymgmt.envelope import (
    DataKey,
    KeyState,
    Opener,
    _seal_with_nonce,
    column_associated_data,
    open_envelope,
    seal,
)
from keymgmt.native import accel
from proxy.encrypt import rows
from proxy.encrypt.engine import ColumnCrypto
from proxy.encrypt.rows import (
    Action,
    ColumnOutput,
    KeyLookup,
    RowDecryptError,
    RowPlan,
    carries_envelope,
    rewrite_data_row,
    rewrite_data_rows,
    rewrite_value_text,
    screen_output,
)
from proxy.pgtypes import SessionFormat, codec_for
from proxy.pgtypes.bytea import BYTEA
from proxy.policy.masks import compile_mask, native_form
from proxy.policy.model import Mask, MaskFunction
from proxy.protocol.codec import CodecError
from proxy.rewrite.catalog import ProtectedColumn

FMT = SessionFormat()
TABLE_OID = 16400

IMPLEMENTATIONS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            accel is None, reason="the accelerator is not loaded (not built, or PGVEIL_IMPL=python)"
        ),
    ),
]


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs the test with the accelerator or, for "python", as if it were not built."""
    if request.param == "python":
        monkeypatch.setattr(rows, "_accel", None)
        monkeypatch.setattr(envelope, "_accel", None)
    return str(request.param)


SSN = ProtectedColumn("public", "customers", "ssn", "text", attnum=2, table_oid=TABLE_OID)
SCORE = ProtectedColumn("public", "customers", "score", "integer", attnum=3, table_oid=TABLE_OID)
EMAIL = ProtectedColumn("public", "customers", "email", "text", attnum=4, table_oid=TABLE_OID)
# Same table name and column name in another schema: its associated data differs only in the schema.
OTHER_SSN = ProtectedColumn("archive", "customers", "ssn", "text", attnum=2, table_oid=16500)

SSN_KEY_ID = bytes.fromhex("5d1d0f1e8a3c4b7f9e2a6c0d4b8f1a37")
SCORE_KEY_ID = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
SSN_MATERIAL = bytes(range(32))
SCORE_MATERIAL = bytes(range(32, 64))
NONCE = bytes.fromhex("000102030405060708090a0b")

SSN_KEY = DataKey.from_material(SSN_KEY_ID, SSN_MATERIAL, column_id=SSN.column_id)
SCORE_KEY = DataKey.from_material(SCORE_KEY_ID, SCORE_MATERIAL, column_id=SCORE.column_id)
KEYS = {SSN_KEY_ID: SSN_KEY, SCORE_KEY_ID: SCORE_KEY}

SSN_PLAINTEXT = b"123-45-6789"
SCORE_PLAINTEXT = 42
# The envelope of SSN_PLAINTEXT under SSN_KEY with NONCE, pinned: a change in the layout, the associated
# data or the cipher changes these bytes.
SSN_VECTOR = bytes.fromhex(
    "505601015d1d0f1e8a3c4b7f9e2a6c0d4b8f1a37000102030405060708090a0b"
    "7630e536f1d0ef2dba79aeb25e844a6ce2fc9548899bf9ec776c95"
)


def lookup(key_id: bytes) -> DataKey | None:
    return KEYS.get(key_id)


def output(col: ProtectedColumn, *, server_binary: bool, client_binary: bool) -> ColumnOutput:
    return ColumnOutput(
        col, codec_for(col.declared_type), column_associated_data(col.column_id), server_binary, client_binary
    )


def sealed(col: ProtectedColumn, key: DataKey, canonical: bytes, nonce: bytes = NONCE) -> bytes:
    return _seal_with_nonce(key, canonical, column_associated_data(col.column_id), nonce)


def stored(envelope: bytes, *, server_binary: bool) -> bytes:
    """How the server sends a bytea value: the raw bytes in binary, ``\\x`` hex in text (bytea_output hex)."""
    return envelope if server_binary else b"\\x" + envelope.hex().encode("ascii")


def data_row(*values: bytes | None) -> bytes:
    """A DataRow body ("Message Formats": Int16 count, then Int32 length (-1 for NULL) and bytes each)."""
    parts = [struct.pack("!h", len(values))]
    for v in values:
        parts.append(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v)
    return b"".join(parts)


def ssn_envelope() -> bytes:
    return sealed(SSN, SSN_KEY, SSN_PLAINTEXT)


def score_envelope() -> bytes:
    return sealed(SCORE, SCORE_KEY, SCORE_PLAINTEXT.to_bytes(4, "big", signed=True))


# -- the fixed-key vector ---------------------------------------------------------------------------------


def test_vector_is_the_documented_layout_built_independently() -> None:
    """The envelope built by hand from the documented layout (magic, version, algorithm, key id, nonce,
    ciphertext, tag; associated data = header · 0x00 · column id) with the library's AES-GCM."""
    header = b"PV\x01\x01" + SSN_KEY_ID + NONCE
    by_hand = header + AESGCM(SSN_MATERIAL).encrypt(NONCE, SSN_PLAINTEXT, header + b"\x00public.customers.ssn")
    assert by_hand == SSN_VECTOR
    assert ssn_envelope() == SSN_VECTOR


@pytest.mark.parametrize("server_binary", [False, True], ids=["server-text", "server-binary"])
@pytest.mark.parametrize("client_binary", [False, True], ids=["client-text", "client-binary"])
def test_fixed_vector_row_rewritten_exactly(server_binary: bool, client_binary: bool) -> None:
    plan: RowPlan = (
        None,
        output(SSN, server_binary=server_binary, client_binary=client_binary),
        output(SCORE, server_binary=server_binary, client_binary=client_binary),
        None,
    )
    body = data_row(
        b"7",
        stored(SSN_VECTOR, server_binary=server_binary),
        stored(score_envelope(), server_binary=server_binary),
        b"Ada",
    )
    # text: text in both formats (UTF-8 client); integer: decimal text or Int32 big-endian.
    score = b"\x00\x00\x00\x2a" if client_binary else b"42"
    expected = (
        b"\x00\x04"
        + b"\x00\x00\x00\x01" + b"7"
        + b"\x00\x00\x00\x0b" + b"123-45-6789"
        + struct.pack("!i", len(score)) + score
        + b"\x00\x00\x00\x03" + b"Ada"
    )  # fmt: skip
    assert rewrite_data_row(body, plan, lookup, FMT) == expected


def test_text_is_converted_to_the_client_encoding() -> None:
    canonical = "Zoë".encode()
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    body = data_row(sealed(SSN, SSN_KEY, canonical))
    latin1 = SessionFormat(client_encoding="LATIN1")
    assert rewrite_data_row(body, plan, lookup, latin1) == data_row(b"Zo\xeb")
    assert rewrite_data_row(body, plan, lookup, FMT) == data_row(canonical)


def test_copy_field_in_bytea_text_is_opened_to_declared_text() -> None:
    out = output(SCORE, server_binary=False, client_binary=False)
    assert rewrite_value_text(stored(score_envelope(), server_binary=False), out, lookup, FMT) == b"42"


# -- what is left alone -----------------------------------------------------------------------------------


@pytest.mark.parametrize("server_binary", [False, True], ids=["server-text", "server-binary"])
def test_nulls_stay_null(server_binary: bool) -> None:
    plan: RowPlan = (
        None,
        output(SSN, server_binary=server_binary, client_binary=False),
        output(SCORE, server_binary=server_binary, client_binary=True),
    )
    all_null = data_row(b"1", None, None)
    assert rewrite_data_row(all_null, plan, lookup, FMT) == all_null
    mixed = data_row(None, None, stored(score_envelope(), server_binary=server_binary))
    assert rewrite_data_row(mixed, plan, lookup, FMT) == data_row(None, None, b"\x00\x00\x00\x2a")


def test_unprotected_columns_are_byte_identical_even_if_they_hold_envelopes() -> None:
    """A column the plan does not mark is never opened, whatever it holds: an envelope, bytes that are
    no envelope, an empty string, binary junk."""
    plan: RowPlan = (None, output(SSN, server_binary=True, client_binary=False), None, None, None)
    unprotected = [stored(SSN_VECTOR, server_binary=False), b"", b"\xff\x00\xfe" * 100, SSN_VECTOR]
    body = data_row(unprotected[0], SSN_VECTOR, *unprotected[1:])
    assert rewrite_data_row(body, plan, lookup, FMT) == data_row(unprotected[0], SSN_PLAINTEXT, *unprotected[1:])


# -- every fault is an error naming the column ---------------------------------------------------------


def assert_refused(body: bytes, plan: RowPlan, column: ProtectedColumn) -> RowDecryptError:
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(body, plan, lookup, FMT)
    assert info.value.column == column
    return info.value


@pytest.mark.parametrize("server_binary", [False, True], ids=["server-text", "server-binary"])
def test_every_single_byte_flip_of_the_envelope_is_refused(server_binary: bool) -> None:
    plan: RowPlan = (
        None,
        output(SSN, server_binary=server_binary, client_binary=False),
        output(SCORE, server_binary=server_binary, client_binary=True),
    )
    score = stored(score_envelope(), server_binary=server_binary)
    wrong: list[tuple[int, int]] = []
    for position in range(len(SSN_VECTOR)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(SSN_VECTOR)
            tampered[position] ^= mask
            body = data_row(b"1", stored(bytes(tampered), server_binary=server_binary), score)
            try:
                rewrite_data_row(body, plan, lookup, FMT)
            except RowDecryptError as e:
                if e.column != SSN:
                    wrong.append((position, mask))
            else:
                wrong.append((position, mask))
    assert wrong == []


def test_tampered_hex_text_is_refused() -> None:
    plan: RowPlan = (output(SSN, server_binary=False, client_binary=False),)
    text = stored(SSN_VECTOR, server_binary=False)
    for bad in (text[2:], b"\\X" + text[2:], text + b"0", text[:-1] + b"g", text.replace(b"5", b"\xd5", 1), b""):
        assert_refused(data_row(bad), plan, SSN)


def test_truncated_or_extended_envelope_is_refused() -> None:
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    for bad in (SSN_VECTOR[:-1], SSN_VECTOR[:47], SSN_VECTOR + b"\x00", b"PV\x01\x01", b""):
        assert_refused(data_row(bad), plan, SSN)


def test_value_moved_to_another_column_is_refused() -> None:
    """Same key, same type, same table: only the associated data (the column id) tells them apart."""
    shared_key = {SSN_KEY_ID: SSN_KEY}.get
    plan: RowPlan = (
        output(SSN, server_binary=True, client_binary=False),
        output(EMAIL, server_binary=True, client_binary=False),
    )
    body = data_row(SSN_VECTOR, SSN_VECTOR)
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(body, plan, shared_key, FMT)
    assert info.value.column == EMAIL
    assert rewrite_data_row(data_row(SSN_VECTOR, None), plan, shared_key, FMT) == data_row(SSN_PLAINTEXT, None)


def test_value_moved_to_the_same_column_of_another_schema_is_refused() -> None:
    plan: RowPlan = (output(OTHER_SSN, server_binary=True, client_binary=False),)
    assert_refused(data_row(SSN_VECTOR), plan, OTHER_SSN)


def test_unknown_key_id_is_refused() -> None:
    plan: RowPlan = (None, output(SCORE, server_binary=True, client_binary=False))
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(data_row(b"1", score_envelope()), plan, {SSN_KEY_ID: SSN_KEY}.get, FMT)
    assert info.value.column == SCORE


def test_disabled_key_is_refused() -> None:
    disabled = {SSN_KEY_ID: SSN_KEY.with_state(KeyState.DISABLED)}.get
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(data_row(SSN_VECTOR), plan, disabled, FMT)
    assert info.value.column == SSN


@pytest.mark.parametrize("client_binary", [False, True], ids=["client-text", "client-binary"])
def test_decrypted_value_invalid_for_the_declared_type_is_refused(client_binary: bool) -> None:
    """An authentic envelope whose plaintext is not a canonical int4 (written while the column was
    declared bigint, or by a buggy writer) must be refused, not sent as a value of the wrong width."""
    plan: RowPlan = (output(SCORE, server_binary=True, client_binary=client_binary),)
    as_int8 = sealed(SCORE, SCORE_KEY, (1 << 40).to_bytes(8, "big", signed=True))
    assert_refused(data_row(as_int8), plan, SCORE)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_row_with_another_column_count_than_the_plan_is_refused(count: int) -> None:
    plan: RowPlan = (None, output(SSN, server_binary=True, client_binary=False), None)
    values = [b"1", SSN_VECTOR, b"x", b"y"][:count]
    assert_refused(data_row(*values), plan, SSN)


def test_row_with_trailing_bytes_or_a_value_cut_short_is_refused() -> None:
    plan: RowPlan = (None, output(SSN, server_binary=True, client_binary=False))
    assert_refused(data_row(b"1", SSN_VECTOR) + b"\x00", plan, SSN)
    plan = (output(SSN, server_binary=True, client_binary=False), None)
    assert_refused(data_row(SSN_VECTOR, b"abc")[:-1], plan, SSN)


def test_row_shorter_than_its_column_count_is_refused() -> None:
    """The count matches the plan but the body ends early: a malformed DataRow is the server breaking the
    protocol (CodecError, which ends the session with 08P01), never a struct.error from the hot path."""
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False), None)
    for body in (data_row(SSN_VECTOR, b"abc")[:-5], b"\x00"):  # last length cut short; not even a count
        with pytest.raises(CodecError, match="malformed DataRow"):
            rewrite_data_row(body, plan, KEYS.get, FMT)


# -- the batch form and its two loops -----------------------------------------------------------------
# rewrite_data_rows picks a fast loop when every protected column comes as a raw envelope and goes out as
# its canonical bytes, and a general loop otherwise. Both are called directly here on the same plans, and
# must agree with an independent oracle (keymgmt's open_envelope and the type's codec), with the row-at-a-
# time form, and with each other on every error.

Outcome = bytes | tuple[str, ...]


def real_output(col: ProtectedColumn, *, server_binary: bool, client_binary: bool) -> ColumnOutput:
    """As the engine builds it (identity for text types to a UTF8 client)."""
    cc = ColumnCrypto(col, codec_for(col.declared_type), column_associated_data(col.column_id))
    return cc.output(server_binary=server_binary, client_binary=client_binary, fmt=FMT)


def frame(*bodies: bytes) -> bytes:
    return b"".join(b"D" + struct.pack("!I", len(b) + 4) + b for b in bodies)


def loops(data: bytes, plan: RowPlan, keys: KeyLookup = lookup, *, end: int | None = None) -> list[Outcome]:
    """The outcome of each kernel that can run ``plan``: the general loop, the fast one where the plan
    allows it, each with the Python and (where built) the accelerator's Opener, and the accelerator's
    kernel where the plan allows it."""
    _, steps, fast, native, _unchanged, _subjects, checks, native_checks = rows._compile(plan)
    stop = len(data) if end is None else end
    openers = [Opener(keys, python=True)] + ([Opener(keys)] if envelope._accel is not None else [])
    check = rows.subject_checker(checks, keys, {})
    runs: list[Callable[[], bytes]] = []
    for opener in openers:
        runs.append(lambda o=opener: rows._rewrite_general(data, 0, stop, plan, steps, o.open, FMT, check))  # type: ignore[misc]
        if fast is not None:
            runs.append(lambda o=opener: rows._rewrite_fast(data, 0, stop, plan, fast, o.open, check))  # type: ignore[misc]
    if native is not None and envelope._accel is not None:
        runs.append(lambda: rows._rewrite_native(data, 0, stop, plan, native, Opener(keys), native_checks))
    outcomes: list[Outcome] = []
    for run in runs:
        try:
            outcomes.append(run())
        except RowDecryptError as e:
            outcomes.append(("refused", e.column.column_id, e.reason))
        except struct.error:
            outcomes.append(("malformed",))
    return outcomes


def single(body: bytes, plan: RowPlan, keys: KeyLookup = lookup) -> Outcome:
    try:
        return frame(rewrite_data_row(body, plan, keys, FMT))
    except RowDecryptError as e:
        return ("refused", e.column.column_id, e.reason)
    except CodecError:
        return ("malformed",)


FAST_PLAN: RowPlan = (
    None,
    real_output(SSN, server_binary=True, client_binary=False),
    real_output(EMAIL, server_binary=True, client_binary=True),
    None,
)
GENERAL_PLAN: RowPlan = (
    None,
    real_output(SSN, server_binary=False, client_binary=False),
    real_output(SCORE, server_binary=True, client_binary=True),
    None,
    real_output(EMAIL, server_binary=False, client_binary=False),
)


# Text columns only, one of them sent by the server as bytea hex text: the general Python loop, and the
# accelerator's kernel where it is built.
TEXT_PLAN: RowPlan = (
    None,
    real_output(SSN, server_binary=False, client_binary=False),
    real_output(EMAIL, server_binary=True, client_binary=True),
    None,
)
PLANS = [FAST_PLAN, GENERAL_PLAN, TEXT_PLAN]
PLAN_IDS = ["fast-plan", "general-plan", "text-plan"]


def test_the_kernels_each_plan_runs() -> None:
    """Which kernels the batch tests compare: the accelerator's runs every plan of identity columns."""
    assert [rows._compile(plan)[2] is not None for plan in PLANS] == [True, False, False]
    native = [rows._compile(plan)[3] is not None for plan in PLANS]
    assert native == ([True, False, True] if rows._accel is not None else [False, False, False])


def test_the_fast_loop_is_chosen_only_for_raw_envelopes_to_canonical_bytes() -> None:
    assert rows._compile(FAST_PLAN)[2] is not None
    assert rows._compile(GENERAL_PLAN)[2] is None
    assert rows._compile((real_output(SSN, server_binary=False, client_binary=False),))[2] is None
    assert rows._compile((real_output(SCORE, server_binary=True, client_binary=False),))[2] is None
    latin1 = ColumnCrypto(SSN, codec_for("text"), column_associated_data(SSN.column_id))
    to_latin1 = latin1.output(server_binary=True, client_binary=False, fmt=SessionFormat(client_encoding="LATIN1"))
    assert rows._compile((to_latin1,))[2] is None


def envelope_of(value: bytes | None, out: ColumnOutput) -> bytes:
    assert value is not None
    return value if out.server_binary else bytes.fromhex(value[2:].decode("ascii"))


def expected_value(stored_value: bytes, out: ColumnOutput) -> bytes:
    canonical = open_envelope(KEYS.__getitem__, envelope_of(stored_value, out), out.associated)
    return out.codec.to_binary(canonical, FMT) if out.client_binary else out.codec.to_text(canonical, FMT)


_PLAIN_TEXT = st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=12)
_LONG_TEXT = st.integers(1000, 1100).map(lambda n: "é" * (n // 2) + "x" * (n % 2))  # around the length table's end
# An envelope inside an unattributed value, as PostgreSQL's output functions write it (written out here,
# not taken from rows.py): raw, hex after its backslash (doubled in an array's text), escape, and escape
# nested in quoting levels (each backslash doubled per level: one, two, four, eight of them).
_ENVELOPE_FORMS = (
    b"PV\x01\x01",
    b"\\x50560101",
    b"\\\\x50560101",
    *(b"PV" + b"\\" * k + b"001" + b"\\" * k + b"001" for k in (1, 2, 4, 8)),
)
# Near misses that must not count: the hex without its backslash, a short header, a missing backslash.
_NEAR_MISSES = (b"x50560101", b"0x50560101ff", b"PV\x01\x02", b"PV001\\001", b"PV\\01\\001", b"\\x5056010")


def _has_envelope_form(value: bytes, whole: bool = False) -> bool:
    if whole:  # a bytea: only as the whole value, from its first byte
        return value.startswith((b"PV\x01\x01", b"\\x50560101")) or (re.match(rb"PV\\+001\\+001", value) is not None)
    return b"PV\x01\x01" in value or b"\\x50560101" in value or re.search(rb"PV\\+001\\+001", value) is not None


def test_the_oracle_knows_the_forms_and_the_near_misses() -> None:
    for form in _ENVELOPE_FORMS:
        assert _has_envelope_form(b"ab" + form + b"cd")
        # A bytea's own output is not nested: its doubled-backslash hex form cannot start it.
        assert _has_envelope_form(form + b"cd", whole=True) == (not form.startswith(b"\\\\"))
        assert not _has_envelope_form(b"ab" + form, whole=True)
    for near in _NEAR_MISSES:
        assert not _has_envelope_form(b"ab" + near + b"cd")
        assert not carries_envelope(b"ab" + near + b"cd")


@st.composite
def _unattributed_values(draw: st.DrawFn) -> bytes:
    """A value of an unattributed column: arbitrary bytes, or one with an envelope's form (or a near miss)
    at its start or somewhere in it, whole or cut short by a byte (which must not count)."""
    form = draw(st.sampled_from(_ENVELOPE_FORMS + _NEAR_MISSES))
    if draw(st.booleans()):
        form = form[: draw(st.integers(0, len(form) - 1))]
    head = draw(st.one_of(st.just(b""), st.binary(max_size=40)))
    tail = draw(st.binary(max_size=40))
    return draw(st.one_of(st.binary(max_size=80), st.just(head + form + tail)))


def _test_mask(col: ProtectedColumn) -> Callable[[bytes], bytes | None]:
    """A stand-in for a compiled mask: keeps the first character of a text (NULL for an empty one), gives
    0 for an integer, so the expected output is computed independently of the kernels."""
    if col == SCORE:
        return lambda canonical: bytes(4)
    return lambda canonical: (canonical[:1] + b"***") if canonical else None


def acted(out: ColumnOutput, action: Action) -> ColumnOutput:
    """``out`` with another action (a plain column's value comes in the client's format)."""
    mask = _test_mask(out.column) if action in (Action.MASK, Action.DECODE_MASK) else None
    server_binary = out.client_binary if action is Action.DECODE_MASK else out.server_binary
    return dataclasses.replace(out, action=action, mask=mask, server_binary=server_binary)


def client_value(canonical: bytes, out: ColumnOutput) -> bytes:
    return out.codec.to_binary(canonical, FMT) if out.client_binary else out.codec.to_text(canonical, FMT)


@st.composite
def plans_and_rows(
    draw: st.DrawFn, *, actions: tuple[Action, ...] = (Action.DECRYPT,)
) -> tuple[RowPlan, list[list[bytes | None]], list[list[bytes | None]]]:
    """A plan, rows as the server sends them, and the same rows as the client must get them."""
    fast = draw(st.booleans())
    plan: list[ColumnOutput | None] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 2)) == 0:
            plan.append(None)
            continue
        col = draw(st.sampled_from([SSN, EMAIL] if fast else [SSN, EMAIL, SCORE]))
        server_binary = True if fast else draw(st.booleans())
        action = draw(st.sampled_from(actions))
        if action is Action.SCREEN:
            plan.append(screen_output(server_binary, whole=draw(st.booleans())))
            continue
        out = real_output(col, server_binary=server_binary, client_binary=draw(st.booleans()))
        plan.append(acted(out, action))
    if all(out is None for out in plan):
        plan.append(real_output(SSN, server_binary=True, client_binary=False))
    stored_rows: list[list[bytes | None]] = []
    client_rows: list[list[bytes | None]] = []
    for _ in range(draw(st.integers(1, 5))):
        stored_row: list[bytes | None] = []
        client_row: list[bytes | None] = []
        for column in plan:
            if draw(st.integers(0, 4)) == 0:
                stored_row.append(None)
                client_row.append(None)
            elif column is None:
                value = draw(st.binary(max_size=80))
                stored_row.append(value)
                client_row.append(value)
            elif column.action is Action.SCREEN:
                value = draw(_unattributed_values())
                stored_row.append(value)
                client_row.append(None if _has_envelope_form(value, column.whole) else value)
            else:
                out = column
                if out.column == SCORE:
                    key, canonical = SCORE_KEY, draw(st.integers(-(2**31), 2**31 - 1)).to_bytes(4, "big", signed=True)
                else:
                    key, canonical = SSN_KEY, draw(st.one_of(_PLAIN_TEXT, _LONG_TEXT)).encode()
                if out.action is Action.DECODE_MASK:  # a plain column: the declared type's value itself
                    stored_row.append(client_value(canonical, out))
                    masked = _test_mask(out.column)(canonical)
                    client_row.append(None if masked is None else client_value(masked, out))
                    continue
                value = stored(seal(key, canonical, out.associated), server_binary=out.server_binary)
                stored_row.append(value)
                if out.action is Action.NULL:
                    client_row.append(None)
                elif out.action is Action.STORED:
                    client_row.append(value)
                elif out.action is Action.MASK:
                    masked = _test_mask(out.column)(canonical)
                    client_row.append(None if masked is None else client_value(masked, out))
                else:
                    client_row.append(expected_value(value, out))
        stored_rows.append(stored_row)
        client_rows.append(client_row)
    return tuple(plan), stored_rows, client_rows


@settings(max_examples=300, deadline=None)
@given(plans_and_rows())
def test_both_loops_batch_and_single_row_forms_agree_with_the_oracle(
    case: tuple[RowPlan, list[list[bytes | None]], list[list[bytes | None]]],
) -> None:
    plan, stored_rows, client_rows = case
    bodies = [data_row(*r) for r in stored_rows]
    expected = frame(*(data_row(*r) for r in client_rows))
    data = b"!!" + frame(*bodies) + b"??"  # a run inside a larger buffer: only data[start:end] is touched
    assert rewrite_data_rows(data, 2, len(data) - 2, plan, lookup, FMT, {}) == expected
    assert b"".join(single(body, plan) for body in bodies) == expected  # type: ignore[misc]
    outcomes = loops(frame(*bodies), plan)
    assert outcomes == [expected] * len(outcomes)


@settings(max_examples=400, deadline=None)
@given(plans_and_rows(actions=tuple(Action)))
def test_every_action_agrees_between_kernels_batch_and_single_row_forms_and_the_oracle(
    case: tuple[RowPlan, list[list[bytes | None]], list[list[bytes | None]]],
) -> None:
    """Decrypted, masked, hidden (NULL, unread), stored and plain-masked columns mixed in one plan: every
    kernel that can run the plan gives the oracle's bytes."""
    plan, stored_rows, client_rows = case
    bodies = [data_row(*r) for r in stored_rows]
    expected = frame(*(data_row(*r) for r in client_rows))
    data = b"!!" + frame(*bodies) + b"??"
    assert rewrite_data_rows(data, 2, len(data) - 2, plan, lookup, FMT, {}) == expected
    assert b"".join(single(body, plan) for body in bodies) == expected  # type: ignore[misc]
    outcomes = loops(frame(*bodies), plan)
    assert outcomes == [expected] * len(outcomes)


# The text masks the accelerator applies itself (masks.native_form), held to proxy.policy.masks' functions
# as the oracle: on text, varchar(n) (native partial, last4, fixed) and char(n) (the functions only).
NOTE = ProtectedColumn("public", "customers", "note", "varchar(8)", attnum=5, table_oid=TABLE_OID)
CODE = ProtectedColumn("public", "customers", "code", "char(8)", attnum=6, table_oid=TABLE_OID)
_MASKS = [
    Mask(MaskFunction.PARTIAL),
    Mask(MaskFunction.LAST4),
    Mask(MaskFunction.EMAIL),
    Mask(MaskFunction.NULL),
    Mask(MaskFunction.HASH),
    Mask(MaskFunction.FIXED, ""),
    Mask(MaskFunction.FIXED, "n/a"),
    Mask(MaskFunction.FIXED, "ø€😀"),
]
# Empty, 1, 2, 4, 5 characters and more; one-to-four-byte characters; no, one or several '@'.
_MASK_CHARS = st.sampled_from(["a", "Z", "@", "@", ".", " ", "*", "é", "ß", "€", "中", "😀", "\U0010ffff"])
_MASK_TEXT = st.one_of(
    st.lists(_MASK_CHARS, max_size=7).map("".join),
    st.sampled_from(["", "a", "é", "ab", "😀€", "abcd", "€€€€", "abcde", "中文中文中", "@", "a@b@c", "@@", "an@ex.co"]),
    st.text(st.characters(codec="utf-8", blacklist_characters="\x00"), max_size=7),
)


@st.composite
def masked_text_plans(draw: st.DrawFn) -> tuple[RowPlan, list[list[bytes | None]], list[list[bytes | None]]]:
    """A plan of masked text columns (and copied ones), rows as the server sends them and as the client
    must get them: what the mask's function makes of each value."""
    plan: list[ColumnOutput | None] = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) == 0:
            plan.append(None)
            continue
        col = draw(st.sampled_from([SSN, EMAIL, NOTE, CODE]))
        out = real_output(col, server_binary=draw(st.booleans()), client_binary=draw(st.booleans()))
        # Not hash: 64 hex digits outgrow a short value's envelope, which only the Python loops serve.
        mask = draw(st.sampled_from([m for m in _MASKS if m.function is not MaskFunction.HASH]))
        masker = compile_mask(mask, col.declared_type, None, col.column_id.encode())
        plan.append(dataclasses.replace(out, action=Action.MASK, mask=masker))
    stored_rows: list[list[bytes | None]] = []
    client_rows: list[list[bytes | None]] = []
    for _ in range(draw(st.integers(1, 4))):
        stored_row: list[bytes | None] = []
        client_row: list[bytes | None] = []
        for column in plan:
            if column is None or draw(st.integers(0, 5)) == 0:
                value = None if column is not None else draw(st.one_of(st.none(), st.binary(max_size=20)))
                stored_row.append(value)
                client_row.append(value)
                continue
            assert column.mask is not None
            canonical = column.codec.canonical_from_text(draw(_MASK_TEXT).encode(), FMT)
            envelope_bytes = seal(SSN_KEY, canonical, column.associated)
            stored_row.append(stored(envelope_bytes, server_binary=column.server_binary))
            masked = column.mask(canonical)
            client_row.append(None if masked is None else client_value(masked, column))
        stored_rows.append(stored_row)
        client_rows.append(client_row)
    return tuple(plan), stored_rows, client_rows


@settings(max_examples=500, deadline=None)
@given(masked_text_plans())
def test_native_text_masks_give_the_mask_functions_bytes(
    case: tuple[RowPlan, list[list[bytes | None]], list[list[bytes | None]]],
) -> None:
    """partial, last4, email, fixed and null on text values of every shape: each kernel, the accelerator's
    (which applies these itself) included, serves what proxy.policy.masks' function gives."""
    plan, stored_rows, client_rows = case
    bodies = [data_row(*r) for r in stored_rows]
    expected = frame(*(data_row(*r) for r in client_rows))
    assert rewrite_data_rows(frame(*bodies), 0, len(frame(*bodies)), plan, lookup, FMT, {}) == expected
    assert b"".join(single(body, plan) for body in bodies) == expected  # type: ignore[misc]
    outcomes = loops(frame(*bodies), plan)
    assert outcomes == [expected] * len(outcomes)
    native = rows._compile(plan)[3]
    if native is not None and rows._NATIVE_TEXT_MASKS:  # the kernel was given the codes, not only the functions
        for out, column in zip(plan, native, strict=True):
            form = None if out is None or out.mask is None else native_form(out.mask)
            assert (isinstance(column, tuple) and len(column) == 5) == (form is not None)


def test_which_masks_the_accelerator_applies_itself() -> None:
    """Plain text: partial, last4, email, fixed, null; varchar(n): not email (it cuts the stars); char(n):
    none but null (its results are padded); hash never."""
    key = b"k" * 32

    def code(mask: Mask, declared_type: str) -> int | None:
        form = native_form(compile_mask(mask, declared_type, key))
        return None if form is None else form[0]

    assert [code(m, "text") for m in _MASKS] == [1, 2, 3, 5, None, 4, 4, 4]
    assert [code(m, "varchar(8)") for m in _MASKS] == [1, 2, None, 5, None, 4, 4, 4]
    assert [code(m, "char(8)") for m in _MASKS] == [None, None, None, 5, None, None, None, None]
    assert native_form(compile_mask(Mask(MaskFunction.FIXED, "ø€😀"), "text", None)) == (4, "ø€😀".encode())


def test_a_kernel_without_text_masks_gets_the_functions_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """An accelerator built before version 3 (no TEXT_MASKS) is given the mask functions alone, and
    serves the same bytes."""
    masker = compile_mask(Mask(MaskFunction.PARTIAL), "text", None)
    out = dataclasses.replace(
        real_output(SSN, server_binary=True, client_binary=False), action=Action.MASK, mask=masker
    )
    data = frame(data_row(SSN_VECTOR, b"x"))
    expected = frame(data_row(masker(open_envelope(KEYS.__getitem__, SSN_VECTOR, out.associated)), b"x"))
    assert rewrite_data_rows(data, 0, len(data), (out, None), lookup, FMT, {}) == expected
    monkeypatch.setattr(rows, "_NATIVE_TEXT_MASKS", False)
    native = rows._compile((out, None))[3]
    if rows._accel is not None:
        assert native is not None
        assert native[0] == (out.associated, True, masker)
    assert rewrite_data_rows(data, 0, len(data), (out, None), lookup, FMT, {}) == expected


def test_a_native_mask_on_a_value_that_is_not_utf8_fails_as_the_function_does() -> None:
    """The kernel leaves a value it cannot read as UTF-8 to the mask's function: the same error."""
    for function in (MaskFunction.PARTIAL, MaskFunction.LAST4):
        masker = compile_mask(Mask(function), "text", None)
        out = dataclasses.replace(
            real_output(SSN, server_binary=True, client_binary=False), action=Action.MASK, mask=masker
        )
        for bad in (b"ab\xffcd", b"\xed\xa0\x80xyz", b"\xc0\xafabc", b"abc\xe2\x82", b"\xf4\x90\x80\x80ab"):
            data = frame(data_row(seal(SSN_KEY, bad, out.associated)))
            with pytest.raises(UnicodeDecodeError):
                masker(bad)
            with pytest.raises(UnicodeDecodeError):
                rewrite_data_rows(data, 0, len(data), (out,), lookup, FMT, {})


def test_a_native_fixed_mask_longer_than_its_envelope_is_served_whole() -> None:
    masker = compile_mask(Mask(MaskFunction.FIXED, "é" * 300), "text", None)
    out = dataclasses.replace(
        real_output(SSN, server_binary=True, client_binary=False), action=Action.MASK, mask=masker
    )
    data = frame(data_row(SSN_VECTOR, b"x"), data_row(None, b"y"))
    expected = frame(data_row("é".encode() * 300, b"x"), data_row(None, b"y"))
    assert rewrite_data_rows(data, 0, len(data), (out, None), lookup, FMT, {}) == expected


HIDDEN_PLAN: RowPlan = (
    None,
    acted(real_output(SSN, server_binary=True, client_binary=False), Action.NULL),
    real_output(EMAIL, server_binary=True, client_binary=True),
    acted(real_output(SCORE, server_binary=False, client_binary=True), Action.NULL),
)


def test_a_hidden_column_runs_in_the_fast_loop_and_the_accelerator() -> None:
    """Hiding decrypts nothing and needs no codec: it does not push a plan off the fast kernels."""
    _, _, fast, native, unchanged, _subjects, _checks, _native_checks = rows._compile(HIDDEN_PLAN)
    assert fast is not None
    assert (native is not None) == (rows._accel is not None)
    assert not unchanged


def test_a_hidden_column_is_never_opened_whatever_it_holds() -> None:
    """Tampered envelopes, garbage, an empty value: a hidden column is NULL, and no key is looked up."""
    looked_up: list[bytes] = []

    def counting(key_id: bytes) -> DataKey | None:
        looked_up.append(key_id)
        return None

    plan: RowPlan = (
        acted(real_output(SSN, server_binary=True, client_binary=False), Action.NULL),
        acted(real_output(SCORE, server_binary=False, client_binary=True), Action.NULL),
        None,
    )
    for first in (SSN_VECTOR, _flip(SSN_VECTOR, 40), b"", b"\\xzz", b"not an envelope"):
        body = data_row(first, b"\x00", b"kept")
        outcomes = loops(frame(body), plan, counting)
        assert outcomes == [frame(data_row(None, None, b"kept"))] * len(outcomes)
        assert rewrite_data_row(body, plan, counting, FMT) == data_row(None, None, b"kept")
    assert looked_up == []


def test_a_plan_of_stored_columns_returns_the_servers_bytes_unread() -> None:
    """Ciphertext for a ciphertext role, a plain column for a plaintext role: nothing is parsed at all."""
    plan: RowPlan = (acted(real_output(SSN, server_binary=False, client_binary=False), Action.STORED), None)
    assert rows._compile(plan)[4]
    data = frame(data_row(b"\\x5056", b"1")) + b"garbage that is no DataRow"
    assert rewrite_data_rows(data, 0, len(data), plan, lookup, FMT, {}) == data


def test_a_mask_gives_null_where_it_has_no_form_and_a_plain_value_of_another_type_is_refused() -> None:
    masked = acted(real_output(SSN, server_binary=True, client_binary=False), Action.MASK)
    assert rewrite_data_row(data_row(sealed(SSN, SSN_KEY, b"")), (masked,), lookup, FMT) == data_row(None)
    assert rewrite_data_row(data_row(SSN_VECTOR), (masked,), lookup, FMT) == data_row(b"1***")
    plain = acted(real_output(SCORE, server_binary=False, client_binary=False), Action.DECODE_MASK)
    assert rewrite_data_row(data_row(b"42"), (plain,), lookup, FMT) == data_row(b"0")
    assert_refused(data_row(b"forty-two"), (plain,), SCORE)
    with pytest.raises(ValueError, match="mask"):
        dataclasses.replace(masked, mask=None)


def test_copy_field_actions() -> None:
    """COPY TO's one-field form: decrypt, mask, NULL, stored and plain-mask."""
    text = stored(SSN_VECTOR, server_binary=False)
    base = real_output(SSN, server_binary=False, client_binary=False)
    assert rewrite_value_text(text, base, lookup, FMT) == SSN_PLAINTEXT
    assert rewrite_value_text(text, acted(base, Action.MASK), lookup, FMT) == b"1***"
    assert rewrite_value_text(text, acted(base, Action.NULL), no_keys, FMT) is None
    assert rewrite_value_text(text, acted(base, Action.STORED), no_keys, FMT) == text
    assert rewrite_value_text(b"Ada", acted(base, Action.DECODE_MASK), no_keys, FMT) == b"A***"


def no_keys(key_id: bytes) -> DataKey | None:
    raise AssertionError("no key is looked up")


def test_a_run_of_rows_without_a_value_to_open_is_returned_as_it_is() -> None:
    data = frame(data_row(b"1", None, None, b"x"), data_row(None, None, None, None))
    outcomes = loops(data, FAST_PLAN)
    assert len(outcomes) >= 2
    assert outcomes == [data] * len(outcomes)
    body = data_row(b"1", None, None, b"x")
    assert rewrite_data_row(body, FAST_PLAN, lookup, FMT) is body


def _good_row(plan: RowPlan, i: int) -> list[bytes | None]:
    values: list[bytes | None] = []
    for out in plan:
        if out is None:
            values.append(b"%d" % i)
        elif out.column == SCORE:
            values.append(stored(score_envelope(), server_binary=out.server_binary))
        else:
            envelope = seal(SSN_KEY, b"value %d" % i, out.associated)
            values.append(stored(envelope, server_binary=out.server_binary))
    return values


def _flip(envelope: bytes, position: int) -> bytes:
    tampered = bytearray(envelope)
    tampered[position] ^= 0x01
    return bytes(tampered)


# The reason each fault is logged and counted with (the client's message is the same for all).
FAULTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "tag": (lambda e: _flip(e, len(e) - 1), "authentication"),
    "ciphertext": (lambda e: _flip(e, 32), "authentication"),
    "nonce": (lambda e: _flip(e, 25), "authentication"),
    "key id": (lambda e: _flip(e, 10), "unknown_key"),
    "version": (lambda e: _flip(e, 2), "not_an_envelope"),
    "magic": (lambda e: b"XV" + e[2:], "not_an_envelope"),
    "too short": (lambda e: e[:47], "not_an_envelope"),
}


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_at_every_position_is_refused_naming_its_column_by_both_loops(plan: RowPlan, fault: str) -> None:
    damage, reason = FAULTS[fault]
    good = [_good_row(plan, i) for i in range(3)]
    for r in range(3):
        for c, out in enumerate(plan):
            if out is None:
                continue
            bad = [list(row) for row in good]
            bad[r][c] = stored(damage(envelope_of(bad[r][c], out)), server_binary=out.server_binary)
            bodies = [data_row(*row) for row in bad]
            refusal = ("refused", out.column.column_id, reason)
            assert single(bodies[r], plan) == refusal, (r, c)
            outcomes = loops(frame(*bodies), plan)
            assert outcomes == [refusal] * len(outcomes), (r, c)


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_a_value_moved_to_another_column_is_refused_by_both_loops(plan: RowPlan) -> None:
    (_, first), *_, (_, last) = [(c, out) for c, out in enumerate(plan) if out is not None]
    assert first is not None
    assert last is not None
    row = _good_row(plan, 0)
    moved = list(row)
    moved[plan.index(last)] = stored(envelope_of(row[plan.index(first)], first), server_binary=last.server_binary)
    refusal = ("refused", last.column.column_id, "authentication")
    outcomes = loops(frame(data_row(*_good_row(plan, 1)), data_row(*moved)), plan)
    assert outcomes == [refusal] * len(outcomes)


def _shapes(plan: RowPlan) -> dict[str, bytes]:
    """Row bodies that do not fit ``plan`` (the plan's last column is unprotected, the one before it not)."""
    row = _good_row(plan, 7)
    good = data_row(*row)
    last_protected = max(c for c, out in enumerate(plan) if out is not None)
    cut_value = list(row)
    value = cut_value[last_protected]
    assert value is not None
    prefix = data_row(*row[:last_protected])[2:]
    return {
        "fewer columns": data_row(*row[:-1]),
        "more columns": data_row(*row, b"extra"),
        "trailing byte": good + b"\x00",
        "last value cut short": good[:-1],
        "last length cut short": good[: -len(row[-1] or b"") - 2],
        "protected value runs past the row": struct.pack("!h", len(plan))
        + prefix
        + struct.pack("!i", len(value) + 1)
        + value,
        "count only": struct.pack("!h", len(plan)),
        "no count": b"\x00",
        "empty": b"",
    }


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_a_row_that_does_not_fit_gets_the_same_error_alone_and_between_other_rows(plan: RowPlan) -> None:
    """A bad row in a run must be judged on its own bytes: the loops read lengths ahead without a bound,
    so the row after it must neither hide nor change the error (malformed message vs. row that does not
    match its description)."""
    before, after = data_row(*_good_row(plan, 1)), data_row(*_good_row(plan, 2))
    seen = set()
    for name, body in _shapes(plan).items():
        alone = single(body, plan)
        assert not isinstance(alone, bytes), name
        seen.add(alone[0])
        outcomes = loops(frame(before, body, after), plan)
        assert outcomes == [alone] * len(outcomes), name
    assert seen == {"refused", "malformed"}


@pytest.mark.parametrize("plan", PLANS, ids=PLAN_IDS)
def test_a_run_with_a_foreign_or_cut_message_is_malformed(plan: RowPlan) -> None:
    good = frame(data_row(*_good_row(plan, 1)))
    malformed: list[Outcome] = [("malformed",)]
    assert loops(good + b"C" + good[1:], plan) == malformed * len(loops(good, plan))  # not a DataRow
    assert loops(good + good, plan, end=len(good) * 2 - 1) == malformed * len(loops(good, plan))  # past the end
    assert loops(good + b"D\x00\x00\x00\x05\x00", plan) == malformed * len(loops(good, plan))  # no room for a count
    with pytest.raises(CodecError, match="malformed DataRow"):
        rewrite_data_rows(good + good, 0, len(good) * 2 - 1, plan, lookup, FMT, {})


def test_a_fixed_width_type_is_checked_even_when_marked_identity() -> None:
    """``identity`` is honoured only for variable-width types: a canonical int4 always has its width
    checked and goes through its codec."""
    out = ColumnOutput(SCORE, codec_for("integer"), column_associated_data(SCORE.column_id), True, False, True)
    as_int8 = sealed(SCORE, SCORE_KEY, (1 << 40).to_bytes(8, "big", signed=True))
    assert_refused(data_row(as_int8), (out,), SCORE)
    assert rewrite_data_row(data_row(score_envelope()), (out,), lookup, FMT) == data_row(b"42")


def test_escape_format_bytea_text_is_opened() -> None:
    """A session with ``bytea_output = escape`` gets envelopes in escape format in text results."""
    plan: RowPlan = (real_output(SSN, server_binary=False, client_binary=False),)
    escaped = BYTEA.to_text(SSN_VECTOR, SessionFormat(bytea_output="escape"))
    assert not escaped.startswith(b"\\x")
    assert rewrite_data_row(data_row(escaped), plan, lookup, FMT) == data_row(SSN_PLAINTEXT)
    assert_refused(data_row(b"\\x" + SSN_VECTOR[:10].hex().encode() + b" " + SSN_VECTOR[10:].hex().encode()), plan, SSN)


def test_memo_keeps_enabled_keys_only_and_follows_the_plan() -> None:
    """A refused key is not remembered (it may be fetched or enabled later); a plan change recompiles."""
    memo: dict[bytes, Any] = {}
    body = data_row(b"1", SSN_VECTOR, None, b"x")
    known: dict[bytes, DataKey] = {}
    with pytest.raises(RowDecryptError) as info:
        rewrite_data_row(body, FAST_PLAN, known.get, FMT, memo)
    assert info.value.reason == "unknown_key"
    known[SSN_KEY_ID] = SSN_KEY.with_state(KeyState.DISABLED)
    for _ in range(2):
        with pytest.raises(RowDecryptError) as info:
            rewrite_data_row(body, FAST_PLAN, known.get, FMT, memo)
        assert info.value.reason == "disabled_key"
    known[SSN_KEY_ID] = SSN_KEY
    assert rewrite_data_row(body, FAST_PLAN, known.get, FMT, memo) == data_row(b"1", SSN_PLAINTEXT, None, b"x")
    assert set(memo) == {b"", b"o"}  # the compiled plan and the result's Opener
    del known[SSN_KEY_ID]  # remembered for this result: no second lookup
    assert rewrite_data_row(body, FAST_PLAN, known.get, FMT, memo) == data_row(b"1", SSN_PLAINTEXT, None, b"x")
    one_column: RowPlan = (real_output(SSN, server_binary=True, client_binary=False),)
    assert rewrite_data_row(data_row(SSN_VECTOR), one_column, known.get, FMT, memo) == data_row(SSN_PLAINTEXT)
    assert memo[b""][0] is one_column


def test_a_refusal_says_which_check_failed_only_in_its_reason() -> None:
    """Every fault gets the same exception type and message shape; only ``reason`` (a bounded set, for
    the log and the metric) differs, and it never carries value bytes."""
    plan: RowPlan = (output(SSN, server_binary=True, client_binary=False),)
    reasons = set()
    for damage, _ in FAULTS.values():
        error = assert_refused(data_row(damage(SSN_VECTOR)), plan, SSN)
        assert str(error) == f"a value of {SSN.column_id} could not be decrypted ({error.reason})"
        reasons.add(error.reason)
    assert reasons <= set(rows.REASONS)
    assert reasons == {"authentication", "unknown_key", "not_an_envelope"}


def test_a_mask_longer_than_its_envelope_is_served_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator's output never outgrows its input: it leaves such a run to the Python loop,
    which gives the same bytes."""
    long_mask = dataclasses.replace(
        acted(real_output(SSN, server_binary=True, client_binary=False), Action.MASK), mask=lambda c: b"#" * 500
    )
    plan: RowPlan = (long_mask, None)
    data = frame(data_row(SSN_VECTOR, b"x"), data_row(None, b"y"))
    expected = frame(data_row(b"#" * 500, b"x"), data_row(None, b"y"))
    assert rewrite_data_rows(data, 0, len(data), plan, lookup, FMT, {}) == expected
    native = rows._compile(plan)[3]
    if rows._accel is not None:
        assert native is not None
        with pytest.raises(rows._Unsupported):
            rows._rewrite_native(data, 0, len(data), plan, native, Opener(lookup))
    monkeypatch.setattr(rows, "_accel", None)  # the Python loops only
    outcomes = loops(data, plan)
    assert outcomes == [expected] * len(outcomes)
